// Runs: loss / lr / tokens-per-second curves of training runs (metrics.jsonl), updated live; eval table; configs.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const POLL_MS = Math.max(100, Number(params.get("poll")) || 2000);
  const MAX_SHOWN = 8;
  const runs = new Map();  // name -> {summary, records: [], offset, shown}
  let timer = null, root = "", inflight = false;

  function cell(v, cls) {
    return LK.el("td", {class: cls}, typeof v === "object" && v !== null ? JSON.stringify(v) : LK.fmt(v));
  }

  function table(head, rows) {
    return LK.el("table", {}, LK.el("thead", {}, LK.el("tr", {}, head.map((h) => LK.el("th", {scope: "col"}, h)))),
      LK.el("tbody", {}, rows));
  }

  function shown() {
    return [...runs.entries()].filter(([, r]) => r.shown);
  }

  function series(key) {
    return shown().map(([name, r], i) => ({
      name, color: LK.colors[i % LK.colors.length],
      points: r.records.filter((x) => key in x).map((x) => [x.step, x[key]]),
    }));
  }

  function drawCharts() {
    const loss = series("loss");
    const evals = series("eval_loss").filter((s) => s.points.length)
      .map((s) => ({...s, name: s.name + " (eval)", dashed: true, dots: true}));
    $("run-charts").replaceChildren(
      LK.lineChart({id: "chart-loss", title: "Training loss", series: [...loss, ...evals], xLabel: "step", yLabel: "loss"}),
      LK.lineChart({id: "chart-lr", title: "Learning rate", series: series("lr"), xLabel: "step", yLabel: "lr", yZero: true}),
      LK.lineChart({id: "chart-tps", title: "Tokens per second", series: series("tokens_per_s"), xLabel: "step",
        yLabel: "tokens/s", yZero: true}));
  }

  function drawEval() {
    const list = shown().map(([, r]) => r.summary);
    const keys = [...new Set(list.flatMap((s) => Object.keys({...s.eval_before, ...s.eval_after})))].sort();
    $("eval-heading").hidden = !list.length;
    if (!keys.length) {
      $("eval-table").replaceChildren(LK.el("p", {class: "muted"}, list.length ? "No eval numbers yet." : ""));
      return;
    }
    const rows = list.map((s) => LK.el("tr", {}, LK.el("th", {scope: "row"}, s.name), LK.el("td", {}, s.status),
      keys.map((k) => {
        const b = s.eval_before ? s.eval_before[k] : undefined, a = s.eval_after ? s.eval_after[k] : undefined;
        return LK.el("td", {class: "num"}, LK.fmt(b) + " → " + (a === undefined ? "…" : LK.fmt(a)));
      })));
    $("eval-table").replaceChildren(table(["Run", "Status", ...keys.map((k) => k + ": before → after")], rows));
  }

  function drawConfigs() {
    const list = shown().map(([, r]) => r.summary);
    $("config-heading").hidden = !list.length;
    const keys = [...new Set(list.flatMap((s) => Object.keys(s.config)))].sort();
    const same = (k) => new Set(list.map((s) => JSON.stringify(s.config[k]))).size === 1;
    const row = (k, cls) => LK.el("tr", {class: cls}, LK.el("th", {scope: "row"}, k), list.map((s) => cell(s.config[k])));
    const head = ["Setting", ...list.map((s) => s.name)];
    const differ = keys.filter((k) => !same(k)), alike = keys.filter(same);
    const parts = [];
    if (list.length > 1) {
      parts.push(differ.length ? table(head, differ.map((k) => row(k, "differs")))
        : LK.el("p", {class: "muted"}, "These runs have the same settings."));
    }
    if (alike.length) {
      const t = table(head, alike.map((k) => row(k)));
      parts.push(list.length > 1 ? LK.el("details", {}, LK.el("summary", {}, `Same in every run (${alike.length})`), t) : t);
    }
    $("config-table").replaceChildren(...parts);
  }

  function drawPicker() {
    $("run-picker").hidden = runs.size < 2;
    $("run-list").replaceChildren(...[...runs.entries()].map(([name, r]) => LK.el("label", {},
      LK.el("input", {type: "checkbox", value: name, checked: r.shown, onchange: (e) => {
        r.shown = e.target.checked;
        draw();
      }}), name)));
  }

  function draw() {
    drawCharts();
    drawEval();
    drawConfigs();
  }

  async function fetchMetrics(name, r) {
    let changed = false;
    for (;;) {
      const page = await LK.api(`/v1/ui/runs/metrics?run=${encodeURIComponent(name)}&offset=${r.offset}`);
      if (page.offset < r.offset) r.records = [];  // the file was replaced (a run started over)
      if (page.records.length) changed = true;
      r.records.push(...page.records);
      r.offset = page.offset;
      if (!page.records.length || page.offset >= page.size) return changed;
    }
  }

  async function poll() {
    clearTimeout(timer);
    if (inflight) return;
    inflight = true;
    const status = $("runs-status");
    try {
      const answer = await LK.api("/v1/ui/runs");
      root = answer.root;
      let changed = false;
      for (const s of answer.data) {
        if (!runs.has(s.name)) {
          runs.set(s.name, {records: [], offset: 0, shown: runs.size < MAX_SHOWN});
          changed = true;
        }
        const r = runs.get(s.name);
        if (JSON.stringify(r.summary) !== JSON.stringify(s)) changed = true;
        r.summary = s;
      }
      for (const name of [...runs.keys()]) if (!answer.data.some((s) => s.name === name)) { runs.delete(name); changed = true; }
      for (const [name, r] of shown()) if (await fetchMetrics(name, r)) changed = true;
      if (!runs.size) {
        $("run-charts").replaceChildren(LK.el("p", {id: "runs-empty"}, `No training runs in ${root} yet. A run is a folder `
          + "written by lorakit train (run.json, metrics.jsonl); this page looks two folders down and shows new runs as they start."));
        $("eval-table").replaceChildren();
        $("config-table").replaceChildren();
        $("eval-heading").hidden = $("config-heading").hidden = true;
      } else if (changed) {
        drawPicker();
        draw();
      }
      status.textContent = `${runs.size} run${runs.size === 1 ? "" : "s"} in ${root}; updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      status.textContent = "";
      $("run-charts").replaceChildren(LK.el("p", {class: "error"}, err.message));
    }
    inflight = false;
    if ($("runs-live").checked && !$("view-runs").hidden) timer = setTimeout(poll, POLL_MS);
  }

  LK.views.runs = {
    init(info) {
      if (!info.runs || this.ready) return;
      this.ready = true;
      $("runs-live").addEventListener("change", () => { if ($("runs-live").checked) poll(); else clearTimeout(timer); });
    },
    show() {
      if (this.ready) poll();
    },
  };
})();
