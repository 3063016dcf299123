// Word-level difference of two answers: the longest common subsequence of words stays plain, the rest is <mark>ed.
"use strict";
(function () {
  // Words and the whitespace after them, so the text reads back exactly.
  function words(text) {
    return text.match(/\S+\s*|\s+/g) || [];
  }

  // Which words of a are in a longest common subsequence with b (compared without trailing whitespace).
  function common(a, b) {
    const n = a.length, m = b.length;
    const ka = a.map((w) => w.trim()), kb = b.map((w) => w.trim());
    const table = Array.from({length: n + 1}, () => new Uint16Array(m + 1));
    for (let i = n - 1; i >= 0; i--) {
      for (let j = m - 1; j >= 0; j--) {
        table[i][j] = ka[i] === kb[j] ? table[i + 1][j + 1] + 1 : Math.max(table[i + 1][j], table[i][j + 1]);
      }
    }
    const keep = new Array(n).fill(false);
    let i = 0, j = 0;
    while (i < n && j < m) {
      if (ka[i] === kb[j]) { keep[i] = true; i++; j++; }
      else if (table[i + 1][j] >= table[i][j + 1]) i++;
      else j++;
    }
    return keep;
  }

  // A fragment of `text` with the words that `other` does not share marked; long answers are not diffed.
  LK.diffFragment = function (text, other) {
    const frag = document.createDocumentFragment();
    const a = words(text), b = words(other);
    if (a.length * b.length > 4e6) { frag.append(text); return frag; }
    const keep = common(a, b);
    let plain = "";
    a.forEach((w, i) => {
      if (keep[i] || !w.trim()) { plain += w; return; }
      if (plain) { frag.append(plain); plain = ""; }
      const core = w.trimEnd();
      frag.append(LK.el("mark", {}, core));
      plain = w.slice(core.length);
    });
    if (plain) frag.append(plain);
    return frag;
  };
})();
