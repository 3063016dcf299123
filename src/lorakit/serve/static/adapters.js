// Adapters: one card per adapter folder (config, size, parameters, model card), its spectrum, load / unload.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);

  function facts(card) {
    const scale = card.r && card.lora_alpha ? card.lora_alpha / (card.use_rslora ? Math.sqrt(card.r) : card.r) : null;
    const targets = Array.isArray(card.target_modules) ? card.target_modules.join(", ") : card.target_modules;
    const rows = [
      ["Base", card.base || "–"], ["Rank r", card.r], ["Alpha", card.lora_alpha],
      ["Scale", scale === null ? "–" : LK.fmt(scale, 3) + (card.use_rslora ? " (rsLoRA)" : "")],
      ["Targets", targets || "–"], ["Size", LK.bytes(card.size_bytes)],
      ["Trainable parameters", LK.fmt(card.parameters)],
    ];
    if (card.use_dora) rows.push(["DoRA", "yes"]);
    return LK.el("dl", {}, rows.flatMap(([k, v]) => [LK.el("dt", {}, k), LK.el("dd", {}, v === undefined ? "–" : v)]));
  }

  function spectrumChart(report) {
    const layers = report.layers.filter((l) => l.singular_values.length && l.singular_values[0] > 0);
    const series = layers.map((l) => ({
      name: l.path, width: 1, opacity: 0.45, hideLegend: true, color: LK.colors[0],
      points: l.singular_values.map((s, i) => [i + 1, s / l.singular_values[0]]),
    }));
    const fig = LK.lineChart({title: "Singular values / largest, per layer", series, xLabel: "index", yLabel: "σ / σ₁",
      yZero: true});
    const eff = layers.map((l) => l.effective_rank_90).sort((a, b) => a - b);
    const median = eff.length ? eff[Math.floor(eff.length / 2)] : 0;
    fig.append(LK.el("p", {class: "spectrum-summary"},
      `${layers.length} layers; median effective rank (90% energy) ${median}. ${report.summary}`));
    const rows = report.layers.map((l) => LK.el("tr", {},
      LK.el("td", {}, l.path), LK.el("td", {class: "num"}, l.rank), LK.el("td", {class: "num"}, l.effective_rank_90),
      LK.el("td", {class: "num"}, l.effective_rank_99), LK.el("td", {class: "num"}, LK.fmt(l.delta_norm, 3))));
    fig.append(LK.el("details", {}, LK.el("summary", {}, "Per layer"), LK.el("div", {class: "table-wrap"},
      LK.el("table", {}, LK.el("thead", {}, LK.el("tr", {}, ["Layer", "r", "eff. rank 90%", "eff. rank 99%", "‖ΔW‖"]
        .map((h) => LK.el("th", {scope: "col"}, h)))), LK.el("tbody", {}, rows)))));
    return fig;
  }

  async function loadSpectrum(card, slot) {
    try {
      const report = await LK.api(`/v1/ui/adapters/${encodeURIComponent(card.name)}/spectrum`);
      slot.replaceChildren(spectrumChart(report));
    } catch (err) {
      slot.replaceChildren(LK.el("p", {class: "error"}, "Spectrum unavailable: " + err.message));
    }
  }

  async function act(card, load, out) {
    out.className = "muted";
    out.textContent = load ? "Loading…" : "Unloading…";
    try {
      if (load) await LK.api("/v1/adapters", {method: "POST", body: {name: card.name}, admin: true});
      else await LK.api(`/v1/adapters/${encodeURIComponent(card.name)}`, {method: "DELETE", admin: true});
      await refresh(`${card.name} ${load ? "loaded" : "unloaded"}.`);
    } catch (err) {
      out.className = "error";
      out.textContent = (load ? "Could not load: " : "Could not unload: ") + err.message;
    }
  }

  function render(card) {
    const out = LK.el("p", {role: "status"});
    const served = card.status !== "not served";
    const spectrum = LK.el("div", {class: "spectrum"}, LK.el("p", {class: "muted"}, "Computing the spectrum…"));
    const node = LK.el("article", {class: "card", "data-adapter": card.name, "aria-label": "Adapter " + card.name},
      LK.el("h3", {}, card.name, LK.el("span", {class: "badge " + card.status.replace(" ", "-")}, card.status)),
      card.error ? LK.el("p", {class: "error"}, "This folder cannot be read: " + card.error) : facts(card),
      LK.el("div", {class: "row"},
        LK.el("button", {type: "button", disabled: card.status === "loaded", onclick: () => act(card, true, out)}, "Load"),
        LK.el("button", {type: "button", disabled: !served, onclick: () => act(card, false, out)}, "Unload")),
      out, spectrum,
      card.readme ? LK.el("details", {}, LK.el("summary", {}, "Model card (README.md)"),
        LK.el("div", {class: "readme"}, card.readme)) : LK.el("p", {class: "muted"}, "No model card (README.md)."));
    if (!card.error) loadSpectrum(card, spectrum);
    else spectrum.replaceChildren();
    return node;
  }

  async function refresh(message) {
    const status = $("adapters-status"), cards = $("adapter-cards");
    status.textContent = "Loading…";
    try {
      const data = (await LK.api("/v1/ui/adapters")).data;
      cards.replaceChildren(...data.map(render));
      status.textContent = message || "";
      if (!data.length) {
        cards.replaceChildren(LK.el("p", {}, LK.info.merged
          ? `This server runs one adapter merged into the base (${LK.info.merged}); it has no adapters to show.`
          : "No adapters: start the server with --adapters DIR (a folder of adapter folders)."));
      }
    } catch (err) {
      status.textContent = "";
      cards.replaceChildren(LK.el("p", {class: "error"}, err.message));
    }
  }

  LK.views.adapters = {
    init() {
      this.loaded = false;  // (re)connected, perhaps with another key: load the cards again when shown
      if (this.ready) return;
      this.ready = true;
      $("adapters-refresh").addEventListener("click", () => refresh());
    },
    show() {
      if (!this.loaded) { this.loaded = true; refresh(); }
    },
  };
})();
