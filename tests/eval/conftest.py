"""The backend tests' `transformers serve` fixture, reused for `tirl eval --base-url`."""

from tests.backends.conftest import served_model_dir, transformers_server  # noqa: F401
