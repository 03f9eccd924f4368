"""The four databases of the text-to-SQL task: their tables, what the question templates may say about
them, and how their rows are drawn from a seed.

Each `Schema` holds the DDL (SQLite, with foreign keys declared so the `sql` tool lists them), the
`Entity` and `Relation` facts the question families are written against, and `fill(rng)`, which
draws every row from one `random.Random`. Names and titles are unique within a table (a question
that names a row must name one row). Every relation leaves some parents without children, so
"customers that placed no orders" is never empty.

Rows are plain Python values; `tirl.tasks.text_to_sql.database` writes them to files.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

Rows = dict[str, list[tuple]]
"""Table name -> rows in column order (ids start at 1)."""


@dataclass(frozen=True)
class Column:
    """A column that questions may filter, group or aggregate on."""

    name: str
    """SQL name."""
    phrase: str
    """How a question names it ("city", "distance in km")."""
    plural: str = ""
    """Plural of `phrase` for categorical columns ("cities"), used by "Which cities have ...?"."""
    summable: bool = False
    """Whether "the total <phrase>" makes sense (quantity: yes; age: no)."""


@dataclass(frozen=True)
class Entity:
    """A table as the questions see it."""

    table: str
    singular: str
    plural: str
    label: str | None = None
    """Column that names one row uniquely (name, title, code); None for link tables (orders, loans)."""
    label_phrase: str = ""
    """How a question names the label ("name", "flight number")."""
    categories: tuple[Column, ...] = ()
    """Text columns with a few distinct values."""
    numbers: tuple[Column, ...] = ()
    """Numeric columns."""

    @property
    def labels(self) -> str:
        """Plural of the label phrase ("names")."""
        return self.label_phrase + "s"


@dataclass(frozen=True)
class Relation:
    """`child.fk` references `parent.id`."""

    child: str
    fk: str
    parent: str
    verb: str
    """Connects the child to its parent: "orders *placed by* customers"."""
    has: str
    """The parents' side, with `{x}` for a quantified child phrase: "that placed {x}" ->
    "that placed no orders", "that placed at least one order whose status is pending"."""
    has_one: str
    """The same for one parent: "that has {x} arriving at it" (for "the airport that has the most ...")."""


@dataclass(frozen=True)
class Schema:
    """One database."""

    name: str
    description: str
    """What it holds, for the `sql` tool's description."""
    ddl: tuple[str, ...]
    entities: tuple[Entity, ...]
    relations: tuple[Relation, ...]
    fill: Callable[[random.Random], Rows]

    def entity(self, table: str) -> Entity:
        return next(e for e in self.entities if e.table == table)


FIRST_NAMES = ("Ada", "Ben", "Chloe", "Dan", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Luca",
               "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yusuf",
               "Zoe", "Aron", "Bela", "Cyril", "Dora", "Emil")
LAST_NAMES = ("Adams", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvat", "Ivanova", "Jensen",
              "Kowalski", "Lopez", "Moreau", "Novak", "Olsen", "Petrov", "Quintero", "Rossi", "Silva", "Tanaka",
              "Urban", "Varga", "Weber", "Yilmaz", "Zhang")
CITIES = (("Paris", "France"), ("Lyon", "France"), ("Berlin", "Germany"), ("Munich", "Germany"),
          ("Madrid", "Spain"), ("Seville", "Spain"), ("Rome", "Italy"), ("Milan", "Italy"), ("Lisbon", "Portugal"))


def _people(rng: random.Random, count: int) -> list[str]:
    """`count` distinct "First Last" names."""
    return [f"{a} {b}" for a, b in rng.sample(list(product(FIRST_NAMES, LAST_NAMES)), count)]


def _titles(rng: random.Random, count: int, first: tuple[str, ...], second: tuple[str, ...]) -> list[str]:
    """`count` distinct "First Second" titles."""
    return [f"{a} {b}" for a, b in rng.sample(list(product(first, second)), count)]


def _parents(rng: random.Random, ids: int, share: float = 0.8) -> list[int]:
    """The parent ids children may point to: a random `share` of 1..ids, so some parents have none."""
    return sorted(rng.sample(range(1, ids + 1), max(1, round(ids * share))))


def _date(rng: random.Random, year: int) -> str:
    return f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


# --- shop --------------------------------------------------------------------------------------------

PRODUCT_WORDS = ("Classic", "Compact", "Deluxe", "Eco", "Golden", "Mini", "Nordic", "Pro", "Rustic", "Smart",
                 "Solar", "Urban")
PRODUCT_KINDS = {"Kitchen": ("Kettle", "Blender", "Pan"), "Garden": ("Hose", "Planter", "Shovel"),
                 "Toys": ("Puzzle", "Robot", "Kite"), "Electronics": ("Speaker", "Charger", "Headset"),
                 "Sports": ("Racket", "Ball", "Helmet"), "Books": ("Atlas", "Cookbook", "Novel")}
ORDER_STATUSES = ("pending", "shipped", "delivered", "cancelled")


def _fill_shop(rng: random.Random) -> Rows:
    cities = [rng.choice(CITIES) for _ in range(40)]
    customers = [(i + 1, name, city, country, rng.randint(18, 75))
                 for i, (name, (city, country)) in enumerate(zip(_people(rng, 40), cities))]
    kinds = [(category, kind) for category, kinds in PRODUCT_KINDS.items() for kind in kinds]
    names = rng.sample([(f"{w} {k}", c) for w, (c, k) in product(PRODUCT_WORDS, kinds)], 32)
    products = [(i + 1, name, category, round(rng.uniform(3, 400), 2), rng.randint(0, 250))
                for i, (name, category) in enumerate(names)]
    buyers, sold = _parents(rng, len(customers)), _parents(rng, len(products), 0.85)
    orders = [(i + 1, rng.choice(buyers), rng.choice(sold), rng.randint(1, 9), _date(rng, rng.choice((2023, 2024))),
               rng.choices(ORDER_STATUSES, weights=(2, 3, 6, 1))[0]) for i in range(160)]
    return {"customers": customers, "products": products, "orders": orders}


SHOP = Schema(
    name="shop",
    description="the customers, products and orders of an online shop",
    ddl=(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL, "
        "country TEXT NOT NULL, age INTEGER NOT NULL)",
        "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL, "
        "price REAL NOT NULL, stock INTEGER NOT NULL)",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id), "
        "product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL, order_date TEXT NOT NULL, "
        "status TEXT NOT NULL)",
    ),
    entities=(
        Entity("customers", "customer", "customers", "name", "name",
               (Column("city", "city", "cities"), Column("country", "country", "countries")), (Column("age", "age"),)),
        Entity("products", "product", "products", "name", "name", (Column("category", "category", "categories"),),
               (Column("price", "price", summable=True), Column("stock", "stock", summable=True))),
        Entity("orders", "order", "orders", categories=(Column("status", "status", "statuses"),),
               numbers=(Column("quantity", "quantity", summable=True),)),
    ),
    relations=(
        Relation("orders", "customer_id", "customers", "placed by", "that placed {x}", "that placed {x}"),
        Relation("orders", "product_id", "products", "for", "that appear in {x}", "that appears in {x}"),
    ),
    fill=_fill_shop,
)

# --- school ------------------------------------------------------------------------------------------

DEPARTMENTS = ("Mathematics", "Physics", "History", "Biology", "Music")
COURSE_WORDS = ("Introduction to", "Advanced", "Applied", "Topics in", "Foundations of")
COURSE_SUBJECTS = {"Mathematics": ("Algebra", "Geometry", "Statistics"), "Physics": ("Mechanics", "Optics", "Waves"),
                   "History": ("Antiquity", "Empires", "Revolutions"), "Biology": ("Genetics", "Ecology", "Cells"),
                   "Music": ("Harmony", "Composition", "Jazz")}
TERMS = ("autumn", "spring", "summer")


def _fill_school(rng: random.Random) -> Rows:
    people = _people(rng, 60)
    students = [(i + 1, name, rng.choice(CITIES)[0], rng.randint(17, 30)) for i, name in enumerate(people[:44])]
    teachers = [(i + 1, name, rng.choice(DEPARTMENTS), rng.randrange(38_000, 90_000, 500))
                for i, name in enumerate(people[44:58])]
    subjects = [(department, s) for department, ss in COURSE_SUBJECTS.items() for s in ss]
    picked = rng.sample([(f"{w} {s}", d) for w, (d, s) in product(COURSE_WORDS, subjects)], 24)
    lecturers = _parents(rng, len(teachers))
    courses = [(i + 1, title, department, rng.choice((2, 3, 4, 5, 6)), rng.choice(lecturers))
               for i, (title, department) in enumerate(picked)]
    learners, taught = _parents(rng, len(students), 0.85), _parents(rng, len(courses), 0.85)
    enrolments = [(i + 1, rng.choice(learners), rng.choice(taught), rng.choice(TERMS), rng.randint(35, 100))
                  for i in range(170)]
    return {"students": students, "teachers": teachers, "courses": courses, "enrolments": enrolments}


SCHOOL = Schema(
    name="school",
    description="the students, teachers, courses and course enrolments of a school",
    ddl=(
        "CREATE TABLE students (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL, age INTEGER NOT NULL)",
        "CREATE TABLE teachers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, department TEXT NOT NULL, "
        "salary INTEGER NOT NULL)",
        "CREATE TABLE courses (id INTEGER PRIMARY KEY, title TEXT NOT NULL, department TEXT NOT NULL, "
        "credits INTEGER NOT NULL, teacher_id INTEGER NOT NULL REFERENCES teachers(id))",
        "CREATE TABLE enrolments (id INTEGER PRIMARY KEY, student_id INTEGER NOT NULL REFERENCES students(id), "
        "course_id INTEGER NOT NULL REFERENCES courses(id), term TEXT NOT NULL, score INTEGER NOT NULL)",
    ),
    entities=(
        Entity("students", "student", "students", "name", "name", (Column("city", "city", "cities"),),
               (Column("age", "age"),)),
        Entity("teachers", "teacher", "teachers", "name", "name",
               (Column("department", "department", "departments"),), (Column("salary", "salary", summable=True),)),
        Entity("courses", "course", "courses", "title", "title", (Column("department", "department", "departments"),),
               (Column("credits", "number of credits", summable=True),)),
        Entity("enrolments", "enrolment", "enrolments", categories=(Column("term", "term", "terms"),),
               numbers=(Column("score", "score"),)),
    ),
    relations=(
        Relation("courses", "teacher_id", "teachers", "taught by", "that teach {x}", "that teaches {x}"),
        Relation("enrolments", "student_id", "students", "of", "that have {x}", "that has {x}"),
        Relation("enrolments", "course_id", "courses", "in", "that have {x}", "that has {x}"),
    ),
    fill=_fill_school,
)

# --- library -----------------------------------------------------------------------------------------

GENRES = ("fantasy", "mystery", "poetry", "history", "science", "romance")
BOOK_FIRST = ("The Silent", "The Last", "A Distant", "The Hidden", "The Broken", "The Golden", "A Quiet", "The Lost",
              "The Northern", "The Paper")
BOOK_SECOND = ("River", "Garden", "Empire", "Letter", "Mountain", "Harbour", "Clock", "Forest", "Island", "Lantern")


def _fill_library(rng: random.Random) -> Rows:
    people = _people(rng, 56)
    authors = [(i + 1, name, rng.choice(CITIES)[1], rng.randint(1920, 1995)) for i, name in enumerate(people[:20])]
    writers = _parents(rng, len(authors))
    books = [(i + 1, title, rng.choice(GENRES), rng.randint(1950, 2023), rng.randint(90, 900), rng.choice(writers))
             for i, title in enumerate(_titles(rng, 50, BOOK_FIRST, BOOK_SECOND))]
    members = [(i + 1, name, rng.choice(CITIES)[0], rng.randint(16, 80)) for i, name in enumerate(people[20:])]
    lent, readers = _parents(rng, len(books), 0.85), _parents(rng, len(members), 0.85)
    loans = [(i + 1, rng.choice(lent), rng.choice(readers), _date(rng, 2024), rng.randint(1, 42)) for i in range(150)]
    return {"authors": authors, "books": books, "members": members, "loans": loans}


LIBRARY = Schema(
    name="library",
    description="the authors, books, members and book loans of a library",
    ddl=(
        "CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL, country TEXT NOT NULL, "
        "birth_year INTEGER NOT NULL)",
        "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, genre TEXT NOT NULL, "
        "published_year INTEGER NOT NULL, pages INTEGER NOT NULL, author_id INTEGER NOT NULL REFERENCES authors(id))",
        "CREATE TABLE members (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL, age INTEGER NOT NULL)",
        "CREATE TABLE loans (id INTEGER PRIMARY KEY, book_id INTEGER NOT NULL REFERENCES books(id), "
        "member_id INTEGER NOT NULL REFERENCES members(id), loan_date TEXT NOT NULL, days INTEGER NOT NULL)",
    ),
    entities=(
        Entity("authors", "author", "authors", "name", "name", (Column("country", "country", "countries"),),
               (Column("birth_year", "birth year"),)),
        Entity("books", "book", "books", "title", "title", (Column("genre", "genre", "genres"),),
               (Column("pages", "number of pages", summable=True), Column("published_year", "publication year"))),
        Entity("members", "member", "members", "name", "name", (Column("city", "city", "cities"),),
               (Column("age", "age"),)),
        Entity("loans", "loan", "loans", numbers=(Column("days", "number of days", summable=True),)),
    ),
    relations=(
        Relation("books", "author_id", "authors", "written by", "that wrote {x}", "that wrote {x}"),
        Relation("loans", "book_id", "books", "of", "that have {x}", "that has {x}"),
        Relation("loans", "member_id", "members", "made by", "that made {x}", "that made {x}"),
    ),
    fill=_fill_library,
)

# --- flights -----------------------------------------------------------------------------------------

AIRPORTS = (("CDG", "Paris", "France"), ("LYS", "Lyon", "France"), ("NCE", "Nice", "France"),
            ("BER", "Berlin", "Germany"), ("MUC", "Munich", "Germany"), ("FRA", "Frankfurt", "Germany"),
            ("MAD", "Madrid", "Spain"), ("BCN", "Barcelona", "Spain"), ("FCO", "Rome", "Italy"),
            ("MXP", "Milan", "Italy"), ("LIS", "Lisbon", "Portugal"), ("OPO", "Porto", "Portugal"),
            ("AMS", "Amsterdam", "Netherlands"), ("VIE", "Vienna", "Austria"), ("ZRH", "Zurich", "Switzerland"),
            ("CPH", "Copenhagen", "Denmark"))
AIRLINES = (("Aurora Air", "Denmark"), ("Bluebird Airways", "France"), ("Cielo", "Spain"), ("Delta Wing", "Germany"),
            ("Edelweiss Jet", "Switzerland"), ("Falcon Lines", "Italy"), ("Gull Express", "Portugal"),
            ("Heron Air", "Netherlands"), ("Ibex Airlines", "Austria"), ("Jetstream Europa", "Germany"))


def _fill_flights(rng: random.Random) -> Rows:
    airlines = [(i + 1, name, country, rng.randint(8, 180)) for i, (name, country) in enumerate(AIRLINES)]
    airports = [(i + 1, code, city, country) for i, (code, city, country) in enumerate(AIRPORTS)]
    carriers = _parents(rng, len(airlines))
    origins, destinations = _parents(rng, len(airports), 0.85), _parents(rng, len(airports), 0.85)
    numbers = rng.sample(range(100, 1000), 130)
    flights = []
    for i, number in enumerate(numbers):
        airline, origin = rng.choice(carriers), rng.choice(origins)
        destination = rng.choice([d for d in destinations if d != origin])
        distance = rng.randint(250, 2400)
        price = round(30 + distance * rng.uniform(0.05, 0.25), 2)
        code = "".join(w[0] for w in airlines[airline - 1][1].split())[:2].upper().ljust(2, "X")
        flights.append((i + 1, f"{code}{number}", airline, origin, destination, distance, price))
    return {"airlines": airlines, "airports": airports, "flights": flights}


FLIGHTS = Schema(
    name="flights",
    description="the airlines, airports and scheduled flights of a flight network",
    ddl=(
        "CREATE TABLE airlines (id INTEGER PRIMARY KEY, name TEXT NOT NULL, country TEXT NOT NULL, "
        "fleet_size INTEGER NOT NULL)",
        "CREATE TABLE airports (id INTEGER PRIMARY KEY, code TEXT NOT NULL, city TEXT NOT NULL, country TEXT NOT NULL)",
        "CREATE TABLE flights (id INTEGER PRIMARY KEY, flight_number TEXT NOT NULL, "
        "airline_id INTEGER NOT NULL REFERENCES airlines(id), origin_id INTEGER NOT NULL REFERENCES airports(id), "
        "destination_id INTEGER NOT NULL REFERENCES airports(id), distance_km INTEGER NOT NULL, price REAL NOT NULL)",
    ),
    entities=(
        Entity("airlines", "airline", "airlines", "name", "name", (Column("country", "country", "countries"),),
               (Column("fleet_size", "fleet size", summable=True),)),
        Entity("airports", "airport", "airports", "code", "code", (Column("country", "country", "countries"),)),
        Entity("flights", "flight", "flights", "flight_number", "flight number",
               numbers=(Column("distance_km", "distance in km", summable=True), Column("price", "price"))),
    ),
    relations=(
        Relation("flights", "airline_id", "airlines", "operated by", "that operate {x}", "that operates {x}"),
        Relation("flights", "origin_id", "airports", "departing from", "that have {x} departing from them",
                 "that has {x} departing from it"),
        Relation("flights", "destination_id", "airports", "arriving at", "that have {x} arriving at them",
                 "that has {x} arriving at it"),
    ),
    fill=_fill_flights,
)

SCHEMAS: dict[str, Schema] = {s.name: s for s in (SHOP, SCHOOL, LIBRARY, FLIGHTS)}
"""Every database of the task, by name."""
