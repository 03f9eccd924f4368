// The trajectory viewer. Everything from the run is untrusted text: it is inserted only as text nodes
// (el() below), never as HTML.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("tirl-data").textContent);
  var root = document.getElementById("viewer");
  if (!root) return;
  var sourceById = {};
  data.sources.forEach(function (s) { sourceById[s.id] = s; });

  function el(tag, props) {
    var node = document.createElement(tag);
    if (props) {
      Object.keys(props).forEach(function (k) {
        if (k === "class") node.className = props[k];
        else if (k === "text") node.textContent = props[k];
        else node.setAttribute(k, props[k]);
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      node.append(typeof c === "string" || typeof c === "number" ? String(c) : c);
    }
    return node;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined) return "–";
    return typeof x === "number" ? x.toFixed(digits === undefined ? 3 : digits) : String(x);
  }
  function correctMark(c) {
    if (c === true) return el("span", { class: "ok", title: "correct" }, "✓");
    if (c === false) return el("span", { class: "bad", title: "wrong" }, "✗");
    return el("span", { class: "absent" }, "–");
  }
  var FINISH = { eos: "end-of-turn token", stop: "tool-call end", length: "token limit" };
  function isError(status) { return status !== "ok" && status !== "output_truncated"; }

  // ----- controls
  var sourceSel = el("select", { id: "source" }, el("option", { value: "all" }, "all sources"));
  data.sources.forEach(function (s) {
    sourceSel.append(el("option", { value: s.id }, s.label + " (" + s.trajs.length + " of " + s.total + ")"));
  });
  var outcomeSel = el("select", { id: "outcome" });
  [["all", "all"], ["correct", "correct"], ["wrong", "wrong"], ["tool-errors", "with tool errors"],
   ["no-calls", "no tool calls"], ["untrained", "not trained on"]].forEach(function (o) {
    outcomeSel.append(el("option", { value: o[0] }, o[1]));
  });
  var minReward = el("input", { id: "min-reward", type: "number", step: "any", placeholder: "min" });
  var maxReward = el("input", { id: "max-reward", type: "number", step: "any", placeholder: "max" });
  var search = el("input", { id: "search", type: "search", placeholder: "task id or text" });
  var sortSel = el("select", { id: "sort" });
  [["source", "step / stage order"], ["reward-desc", "reward, high first"], ["reward-asc", "reward, low first"],
   ["calls-desc", "tool calls, most first"], ["length-desc", "sampled tokens, most first"]].forEach(function (o) {
    sortSel.append(el("option", { value: o[0] }, o[1]));
  });
  var controls = el("div", { class: "controls" },
    el("label", null, "source ", sourceSel), el("label", null, "show ", outcomeSel),
    el("label", null, "reward ", minReward, " to ", maxReward), el("label", null, "find ", search),
    el("label", null, "sort ", sortSel));
  var count = el("div", { class: "count", id: "count" });
  var tbody = el("tbody");
  var list = el("table", { class: "traj-list", id: "traj-list" },
    el("thead", null, el("tr", null, el("th", null, "source"), el("th", null, "task"), el("th", null, "reward"),
      el("th", null, "ok"), el("th", null, "calls"), el("th", null, "err"), el("th", null, "stop"))), tbody);
  var detail = el("div", { class: "detail", id: "traj-detail" },
    el("p", { class: "placeholder" }, "Pick a trajectory on the left."));
  root.append(controls, el("div", { class: "viewer" },
    el("div", null, count, el("div", { class: "list-wrap" }, list)), detail));

  // ----- filtering and sorting
  function matches(t, i) {
    var src = sourceSel.value;
    if (src !== "all" && t.source !== src) return false;
    var o = outcomeSel.value;
    if (o === "correct" && t.correct !== true) return false;
    if (o === "wrong" && t.correct !== false) return false;
    if (o === "tool-errors" && !t.n_errors) return false;
    if (o === "no-calls" && t.n_calls) return false;
    if (o === "untrained" && t.trained) return false;
    var lo = parseFloat(minReward.value), hi = parseFloat(maxReward.value);
    if (!isNaN(lo) && !(t.reward >= lo)) return false;
    if (!isNaN(hi) && !(t.reward <= hi)) return false;
    var q = search.value.trim().toLowerCase();
    if (q && !haystack(t).includes(q)) return false;
    return true;
  }
  function haystack(t) {
    if (t._hay === undefined) {
      var parts = [t.task, t.final || ""];
      t.turns.forEach(function (u) {
        parts.push(u.text);
        u.results.forEach(function (r) { parts.push(r.content); });
      });
      t._hay = parts.join("\n").toLowerCase();
    }
    return t._hay;
  }
  var sorters = {
    "source": function (a, b) { return a - b; },
    "reward-desc": function (a, b) { return (data.trajs[b].reward - data.trajs[a].reward) || a - b; },
    "reward-asc": function (a, b) { return (data.trajs[a].reward - data.trajs[b].reward) || a - b; },
    "calls-desc": function (a, b) { return (data.trajs[b].n_calls - data.trajs[a].n_calls) || a - b; },
    "length-desc": function (a, b) { return (data.trajs[b].n_sampled - data.trajs[a].n_sampled) || a - b; }
  };
  var selected = null;
  function renderList() {
    var idx = [];
    data.trajs.forEach(function (t, i) { if (matches(t, i)) idx.push(i); });
    idx.sort(sorters[sortSel.value]);
    tbody.replaceChildren();
    idx.forEach(function (i) {
      var t = data.trajs[i];
      var row = el("tr", { "data-index": String(i), tabindex: "0", class: i === selected ? "selected" : "" },
        el("td", null, sourceById[t.source].label), el("td", null, t.task + " #" + t.sample),
        el("td", { class: "num" }, fmt(t.reward)), el("td", null, correctMark(t.correct)),
        el("td", { class: "num" }, String(t.n_calls)),
        el("td", { class: "num" + (t.n_errors ? " bad" : "") }, String(t.n_errors)), el("td", null, t.stop));
      row.addEventListener("click", function () { select(i); });
      row.addEventListener("keydown", function (e) { if (e.key === "Enter") select(i); });
      tbody.append(row);
    });
    var src = sourceSel.value === "all" ? null : sourceById[sourceSel.value];
    count.textContent = idx.length + " shown of " + data.trajs.length + " in this page" +
      (src ? "; " + src.label + " had " + src.total + " (" + src.trajs.length + " carried here)" : "");
  }
  [sourceSel, outcomeSel, sortSel].forEach(function (c) { c.addEventListener("change", renderList); });
  [minReward, maxReward, search].forEach(function (c) { c.addEventListener("input", renderList); });

  // ----- one trajectory
  function select(i) {
    selected = i;
    Array.prototype.forEach.call(tbody.children, function (r) {
      r.className = r.getAttribute("data-index") === String(i) ? "selected" : "";
    });
    detail.replaceChildren(renderTrajectory(data.trajs[i]));
  }
  function renderTrajectory(t) {
    var box = el("div", { "data-traj": t.task });
    box.append(el("h3", null, sourceById[t.source].label + " · " + t.task + " · sample " + t.sample));
    box.append(el("ul", { class: "kv" },
      el("li", null, el("b", null, "group"), t.group), el("li", null, el("b", null, "stop"), t.stop),
      el("li", null, el("b", null, "correct"), correctMark(t.correct)),
      el("li", null, el("b", null, "trained on"), t.trained ? "yes" : "no"),
      el("li", null, el("b", null, "tokens"), t.n_prompt + " prompt, " + t.n_sampled + " sampled")));
    box.append(rewardBox(t));
    if (t.error) box.append(el("p", { class: "bad" }, "error: " + t.error));
    if (t.origin) box.append(el("p", { class: "absent" }, "origin: " + t.origin));
    box.append(promptBlock(data.prompts[t.prompt]));
    if (t.ids) box.append(el("div", { class: "legend" }, "tokens: ", el("span", { class: "tok sampled" }, "sampled (loss mask 1)"),
      " ", el("span", { class: "tok inserted" }, "inserted (loss mask 0)")));
    t.turns.forEach(function (u, k) { box.append(renderTurn(t, u, k)); });
    if (t.final !== null && t.final !== undefined) {
      box.append(el("h3", null, "Final answer"), el("pre", { class: "final" }, t.final));
    }
    return box;
  }
  function rewardBox(t) {
    var rows = el("tbody");
    Object.keys(t.components).forEach(function (name) {
      rows.append(el("tr", { "data-component": name }, el("td", null, name), el("td", { class: "num" }, fmt(t.components[name]))));
    });
    var box = el("div", { class: "reward-box" }, el("div", { class: "reward-total" }, "reward " + fmt(t.reward)));
    if (rows.children.length) {
      box.append(el("table", { class: "components" }, el("thead", null, el("tr", null, el("th", null, "component"),
        el("th", null, "value"))), rows));
    } else {
      box.append(el("div", { class: "absent" }, "no named components"));
    }
    var turnRewards = t.turns.map(function (u) { return u.reward; }).filter(function (r) { return r !== null; });
    if (turnRewards.length) box.append(el("div", null, "turn rewards: " + turnRewards.map(function (r) { return fmt(r); }).join(", ")));
    return box;
  }
  function promptBlock(messages) {
    var d = el("details", { class: "prompt" }, el("summary", null, "prompt (" + messages.length + " messages)"));
    messages.forEach(function (m) { d.append(el("div", { class: "role" }, m.role), el("pre", null, m.content)); });
    var user = messages.filter(function (m) { return m.role === "user"; }).pop();
    var out = el("div", null, d);
    if (user) out.append(el("div", { class: "role" }, "user"), el("pre", { class: "user-text" }, user.content));
    return out;
  }
  function renderTurn(t, u, k) {
    var box = el("div", { class: "turn", "data-turn": String(k) });
    box.append(el("div", { class: "turn-head" }, "Turn " + (k + 1),
      el("span", { class: "sub" }, "generation ended by " + (FINISH[u.finish] || u.finish) + (u.reward !== null ? ", turn reward " + fmt(u.reward) : ""))));
    box.append(el("div", { class: "role" }, "model"), el("pre", { class: "model-text" }, u.text));
    var callsById = {};
    u.calls.forEach(function (c) { callsById[c.id] = c; });
    u.results.forEach(function (r) {
      var call = callsById[r.call_id];
      var status = el("span", { class: "status " + (isError(r.status) ? "status-error" : "status-" + r.status) }, r.status);
      box.append(el("div", { class: "call tool-call" },
        el("div", null, el("span", { class: "role" }, "tool call "), (r.name || "(unparsed)") + " ",
          call ? el("code", null, call.args) : el("span", { class: "absent" }, "(not a valid call)")),
        el("div", null, el("span", { class: "role" }, "result "), status, " " + fmt(r.latency_s, 2) + " s"),
        el("pre", { class: "tool-result" }, r.content)));
    });
    if (t.ids) box.append(tokenView(t, u.span[0], u.span[2]));
    return box;
  }
  function tokenView(t, start, end) {
    var view = el("div", { class: "tokens" });
    for (var p = start; p < end && p < t.ids.length; p++) {
      var text = Object.prototype.hasOwnProperty.call(t.fix, p) ? t.fix[p] : data.vocab[t.ids[p]];
      var sampled = t.mask.charAt(p) === "1";
      view.append(el("span", { class: "tok " + (sampled ? "sampled" : "inserted"),
        title: "position " + p + " · id " + t.ids[p] + " · mask " + (sampled ? 1 : 0) }, text === undefined ? "?" : text));
    }
    return el("details", { class: "token-view", open: "" },
      el("summary", null, "tokens " + start + "–" + end + " (" + (end - start) + ")"), view);
  }

  renderList();
})();
