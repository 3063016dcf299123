// Compare: the same prompt (or chat) answered by up to four models side by side, streamed, with tokens/s and a diff.
"use strict";
(function () {
  const MAX = 4;
  const $ = (id) => document.getElementById(id);
  let columns = [];  // {model, node, answer, stats, turns, messages, text, body, controller}
  let busy = false;

  function chosen() {
    return [...document.querySelectorAll("#model-list input:checked")].map((i) => i.value);
  }

  function mode() {
    return document.querySelector("input[name=mode]:checked").value;
  }

  function limitPicks() {
    const boxes = [...document.querySelectorAll("#model-list input")];
    const full = chosen().length >= MAX;
    for (const b of boxes) b.disabled = full && !b.checked;
    $("compare-status").textContent = full ? "Four models chosen: untick one to pick another." : "";
  }

  async function loadModels() {
    const list = $("model-list");
    let data;
    try {
      data = (await LK.api("/v1/models")).data;
    } catch (err) {
      list.replaceChildren(LK.el("span", {class: "error"}, err.message));
      return;
    }
    list.replaceChildren(...data.map((m, i) => LK.el("label", {},
      LK.el("input", {type: "checkbox", value: m.id, checked: i < 3, onchange: limitPicks}),
      m.id + (m.parent ? "" : " (base)"))));
    if (data.length === 1) list.append(LK.el("span", {class: "muted"}, " No adapters are served: only the base model."));
    limitPicks();
  }

  function settings() {
    const num = (id) => (($(id).value === "") ? undefined : Number($(id).value));
    const s = {max_tokens: num("max-tokens"), temperature: num("temperature"), top_p: num("top-p")};
    if (num("seed") !== undefined) s.seed = num("seed");
    return s;
  }

  function makeColumn(model) {
    const col = {model, messages: [], text: "", body: null, controller: null};
    col.turns = LK.el("div", {class: "turns"});
    col.answer = LK.el("div", {class: "answer", "data-state": "idle", "aria-live": "polite", "aria-busy": "false"});
    col.stats = LK.el("p", {class: "stats"}, "–");
    col.code = LK.el("pre", {class: "snippet"});
    const copy = (kind) => LK.el("button", {type: "button", onclick: () => copySnippet(col, kind)}, "Copy " + kind);
    col.node = LK.el("article", {class: "column", "data-model": model, "aria-label": "Answer of " + model},
      LK.el("h3", {}, model), col.turns, col.answer, col.stats,
      LK.el("div", {class: "row"}, copy("curl"), copy("Python"),
        LK.el("details", {}, LK.el("summary", {}, "Code"), col.code)));
    return col;
  }

  function syncColumns() {
    const want = chosen();
    if (want.join("\n") !== columns.map((c) => c.model).join("\n")) {
      columns = want.map(makeColumn);
      $("columns").replaceChildren(...columns.map((c) => c.node));
    }
  }

  // Read an SSE stream of OpenAI chunks into the column as it arrives.
  async function stream(col, path) {
    const started = performance.now();
    let first = null, last = null, chunks = 0, usage = null;
    const res = await fetch(path, {method: "POST", headers: LK.headers(false), body: JSON.stringify(col.body),
      signal: col.controller.signal});
    if (!res.ok) {
      let data = null;
      try { data = await res.json(); } catch (_) { /* not JSON */ }
      throw new LK.ApiError(res.status, LK.explain(res.status, data, res.headers));
    }
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const obj = JSON.parse(line.slice(6));
          if (obj.error) throw new LK.ApiError(500, obj.error.message);
          if (obj.usage) usage = obj.usage;
          const choice = obj.choices && obj.choices[0];
          const piece = choice ? (choice.delta ? choice.delta.content : choice.text) : "";
          if (piece) {
            first = first || performance.now();
            last = performance.now();
            chunks++;
            col.text += piece;
            col.answer.textContent = col.text;
            col.stats.textContent = chunks + " tokens…";
          }
        }
      }
    }
    const tokens = usage ? usage.completion_tokens : chunks;
    const rate = tokens > 1 && last > first ? ((tokens - 1) * 1000) / (last - first) : null;
    col.stats.textContent = `${tokens} tokens · first after ${first ? ((first - started) / 1000).toFixed(2) : "–"} s`
      + (rate ? ` · ${rate.toFixed(1)} tokens/s` : "");
    col.answer.dataset.tokensPerS = rate ? rate.toFixed(2) : "";
  }

  async function run(col, prompt, chat) {
    const s = settings();
    col.body = chat ? {model: col.model, messages: [...col.messages, {role: "user", content: prompt}], ...s}
      : {model: col.model, prompt, ...s};
    col.snippets = snippets(col.body, chat);
    col.code.textContent = col.snippets.Python;
    col.text = "";
    col.controller = new AbortController();
    col.turns.replaceChildren(...col.messages.map((m) => turn(m.role, m.content)), ...(chat ? [turn("user", prompt)] : []));
    col.answer.textContent = "";
    col.answer.className = "answer";
    col.answer.dataset.state = "streaming";
    col.answer.setAttribute("aria-busy", "true");
    const path = chat ? "/v1/chat/completions" : "/v1/completions";
    const body = col.body;
    col.body = {...body, stream: true, stream_options: {include_usage: true}};
    try {
      await stream(col, path);
      col.answer.dataset.state = "done";
      if (chat) col.messages.push({role: "user", content: prompt}, {role: "assistant", content: col.text});
    } catch (err) {
      col.answer.className = "answer error";
      col.answer.dataset.state = "error";
      col.answer.textContent = (col.text ? col.text + "\n\n" : "") + (err.name === "AbortError" ? "Stopped." : err.message);
      col.stats.textContent = err.status ? "error " + err.status : "";
    } finally {
      col.body = body;
      col.answer.setAttribute("aria-busy", "false");
    }
  }

  function turn(role, content) {
    return LK.el("div", {class: "turn"}, LK.el("div", {class: "who"}, role === "user" ? "You" : "Assistant"), content);
  }

  function showDiffs() {
    const on = $("diff-toggle").checked;
    columns.forEach((col, i) => {
      if (col.answer.dataset.state !== "done") return;
      const ref = columns[i === 0 ? 1 : 0];
      if (!on || !ref || ref.answer.dataset.state !== "done") col.answer.textContent = col.text;
      else col.answer.replaceChildren(LK.diffFragment(col.text, ref.text));
    });
  }

  async function send(e) {
    if (e) e.preventDefault();
    if (busy) return;
    const prompt = $("prompt").value;
    if (!prompt.trim()) { $("compare-status").textContent = "Type a prompt first."; return; }
    if (!chosen().length) { $("compare-status").textContent = "Pick at least one model."; return; }
    syncColumns();
    busy = true;
    $("send").disabled = true;
    $("stop").disabled = false;
    $("compare-status").textContent = "Generating…";
    const chat = mode() === "chat";
    await Promise.all(columns.map((c) => run(c, prompt, chat)));
    busy = false;
    $("send").disabled = false;
    $("stop").disabled = true;
    const failed = columns.filter((c) => c.answer.dataset.state === "error").length;
    $("compare-status").textContent = failed ? `${failed} of ${columns.length} answers failed (see below).` : "Done.";
    if (chat) $("prompt").value = "";
    showDiffs();
  }

  // The request of a column as a shell command and as openai-python code (the key comes from $LORAKIT_API_KEY).
  function snippets(body, chat) {
    const base = location.origin + "/v1";
    const path = chat ? "/chat/completions" : "/completions";
    const json = JSON.stringify(body);
    const auth = LK.keys.api ? ` \\\n  -H "Authorization: Bearer $LORAKIT_API_KEY"` : "";
    const curl = `curl -s ${base}${path} \\\n  -H "Content-Type: application/json"${auth} \\\n  -d '${json.replace(/'/g, "'\\''")}'`;
    const args = Object.entries(body).map(([k, v]) => `    ${k}=${JSON.stringify(v).replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False").replace(/\bnull\b/g, "None")},`);
    const call = chat ? "client.chat.completions.create" : "client.completions.create";
    const out = chat ? "r.choices[0].message.content" : "r.choices[0].text";
    const python = ["import os", "", "from openai import OpenAI", "",
      `client = OpenAI(base_url="${base}", api_key=os.environ.get("LORAKIT_API_KEY", "none"))`,
      `r = ${call}(`, ...args, ")", `print(${out})`, ""].join("\n");
    return {curl, Python: python};
  }

  async function copySnippet(col, kind) {
    if (!col.snippets) { $("compare-status").textContent = "Send a prompt first: the code repeats that request."; return; }
    const text = col.snippets[kind];
    col.code.textContent = text;
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      const area = LK.el("textarea", {"aria-hidden": "true"});
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    $("compare-status").textContent = `Copied the ${kind} code for ${col.model}.`;
  }

  LK.views.compare = {
    init(info) {
      if (!info.base) return;
      loadModels();
      if (this.ready) return;
      this.ready = true;
      $("compare-form").addEventListener("submit", send);
      $("prompt").addEventListener("keydown", (e) => {
        if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
      });
      $("stop").addEventListener("click", () => columns.forEach((c) => c.controller && c.controller.abort()));
      $("clear-chat").addEventListener("click", () => { columns = []; $("columns").replaceChildren(); });
      $("diff-toggle").addEventListener("change", showDiffs);
      for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", () => { columns = []; });
    },
  };
})();
