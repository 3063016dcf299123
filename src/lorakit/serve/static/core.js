// lorakit web page: shared pieces (API calls with the user's key, errors in words, tabs, small DOM helpers).
"use strict";
const LK = (window.LK = {views: {}, info: null});

LK.keys = {
  api: localStorage.getItem("lorakit.apiKey") || "",
  admin: localStorage.getItem("lorakit.adminKey") || "",
};

// Build an element: LK.el("td", {class: "num"}, "1.5").
LK.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
};

LK.fmt = function (x, digits = 4) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en");
  return Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : x.toPrecision(digits);
};

LK.bytes = function (n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
};

LK.headers = function (admin) {
  const h = {"Content-Type": "application/json"};
  const key = admin && LK.keys.admin ? LK.keys.admin : LK.keys.api;
  if (key) h.Authorization = "Bearer " + key;
  return h;
};

// An API error in words a person can act on.
LK.explain = function (status, body, headers) {
  const msg = body && body.error && body.error.message ? body.error.message : "";
  if (status === 401) return "This server needs an API key: open “API key” above and enter it." + (msg ? " (" + msg + ")" : "");
  if (status === 403) return "This key may not do that (loading and unloading adapters needs the admin key). " + msg;
  if (status === 429) {
    const wait = headers && headers.get("Retry-After");
    return "The server is busy (too many requests waiting)" + (wait ? "; try again in " + wait + " s." : "; try again shortly.") + (msg ? " " + msg : "");
  }
  if (status === 503) return "The server cannot take requests right now (" + (msg || "service unavailable") + ").";
  return msg || "The server answered " + status + ".";
};

LK.ApiError = class extends Error {
  constructor(status, message) { super(message); this.status = status; }
};

// Call the API; resolves to the JSON body, rejects with an LK.ApiError whose message is already in words.
LK.api = async function (path, {method = "GET", body, admin = false, signal} = {}) {
  let res;
  try {
    res = await fetch(path, {method, headers: LK.headers(admin), body: body === undefined ? undefined : JSON.stringify(body), signal});
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new LK.ApiError(0, "Cannot reach the server at " + location.origin + ": is it still running?");
  }
  let data = null;
  try { data = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) throw new LK.ApiError(res.status, LK.explain(res.status, data, res.headers));
  return data;
};

LK.showError = function (text) {
  const p = document.getElementById("page-error");
  p.textContent = text || "";
  p.hidden = !text;
};

// Tabs: click or arrow keys; the selected view is remembered in the address (#compare, #adapters, #runs).
LK.tabs = function () {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  const select = (tab, focus) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", on);
      t.tabIndex = on ? 0 : -1;
      document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    const name = tab.id.replace("tab-", "");
    history.replaceState(null, "", "#" + name);
    const view = LK.views[name];
    if (view && view.show) view.show();
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (e) => {
      const step = {ArrowRight: 1, ArrowLeft: -1}[e.key];
      if (step) select(tabs[(i + step + tabs.length) % tabs.length], true);
      if (e.key === "Home") select(tabs[0], true);
      if (e.key === "End") select(tabs[tabs.length - 1], true);
    });
  });
  LK.selectTab = (name) => select(document.getElementById("tab-" + name), false);
};

LK.keyForm = function () {
  const api = document.getElementById("api-key"), admin = document.getElementById("admin-key");
  const status = document.getElementById("key-status");
  api.value = LK.keys.api;
  admin.value = LK.keys.admin;
  document.getElementById("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    LK.keys = {api: api.value.trim(), admin: admin.value.trim()};
    localStorage.setItem("lorakit.apiKey", LK.keys.api);
    localStorage.setItem("lorakit.adminKey", LK.keys.admin);
    status.textContent = "Keys saved in this browser.";
    LK.start();
  });
  document.getElementById("forget-keys").addEventListener("click", () => {
    LK.keys = {api: "", admin: ""};
    api.value = admin.value = "";
    localStorage.removeItem("lorakit.apiKey");
    localStorage.removeItem("lorakit.adminKey");
    status.textContent = "Keys forgotten.";
  });
};

// Ask the server what it offers, then let each view set itself up.
LK.start = async function () {
  const info = document.getElementById("server-info");
  LK.showError("");
  try {
    LK.info = await LK.api("/v1/ui/info");
  } catch (err) {
    info.textContent = "Not connected.";
    LK.showError(err.message);
    if (err.status === 401) document.getElementById("keys").open = true;
    return;
  }
  const i = LK.info;
  info.textContent = i.base ? "Base model " + i.base + (i.merged ? " (merged: " + i.merged + ")" : "")
    : "Runs of " + i.runs;
  document.getElementById("tab-compare").hidden = !i.base;
  document.getElementById("tab-adapters").hidden = !i.base;
  document.getElementById("tab-runs").hidden = !i.runs;
  for (const view of Object.values(LK.views)) if (view.init) view.init(i);
  const wanted = location.hash.slice(1);
  const first = [wanted, "compare", "runs"].find((n) => {
    const tab = document.getElementById("tab-" + n);
    return tab && !tab.hidden;
  });
  if (first) LK.selectTab(first);
};

document.addEventListener("DOMContentLoaded", () => {
  LK.tabs();
  LK.keyForm();
  LK.start();
});
