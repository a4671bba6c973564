// Compare: one prompt to the base and to each chosen adapter at once; the answers stream into
// columns, and words that differ from the base column's answer are highlighted.

import { el, serverMetrics, stream } from "./api.js";

function params() {
  const number = (id) => document.getElementById(id).value;
  const out = {
    max_tokens: Number(number("max-tokens")) || 64,
    temperature: Number(number("temperature")),
    top_p: Number(number("top-p")) || 1,
    top_k: Number(number("top-k")) || 0,
  };
  if (number("seed") !== "") out.seed = Number(number("seed"));
  return out;
}

class Column {
  constructor(model, isBase) {
    this.model = model;
    this.isBase = isBase;
    this.history = []; // chat messages, this column's own
    this.turns = el("div", { class: "turns" });
    this.stats = el("span", { class: "muted stats" });
    this.node = el(
      "article",
      { class: "column", "data-model": model },
      el("header", {}, el("strong", { text: model }), isBase ? el("span", { class: "tag", text: "base" }) : null, this.stats),
      this.turns,
    );
  }

  // Send one user turn; `onText` sees the whole answer so far.
  async send(prompt, system, mode, settings, signal) {
    const answer = el("div", { class: "answer streaming" });
    this.turns.append(el("div", { class: "user", text: prompt }), answer);
    this.answer = answer;
    this.text = "";
    const started = performance.now();
    let tokens = 0;
    let body;
    let path;
    if (mode === "chat") {
      const messages = [...(system ? [{ role: "system", content: system }] : []), ...this.history, { role: "user", content: prompt }];
      body = { model: this.model, messages, ...settings, stream_options: { include_usage: true } };
      path = "/v1/chat/completions";
    } else {
      body = { model: this.model, prompt, ...settings, stream_options: { include_usage: true } };
      path = "/v1/completions";
    }
    try {
      for await (const event of stream(path, body, signal)) {
        if (event.usage) tokens = event.usage.completion_tokens;
        const choice = event.choices?.[0];
        if (!choice) continue;
        const piece = mode === "chat" ? choice.delta?.content || "" : choice.text || "";
        if (piece) {
          this.text += piece;
          answer.textContent = this.text;
        }
        if (choice.finish_reason) answer.dataset.finish = choice.finish_reason;
      }
      if (mode === "chat") this.history.push({ role: "user", content: prompt }, { role: "assistant", content: this.text });
      const seconds = (performance.now() - started) / 1000;
      this.stats.textContent = `${tokens} tokens, ${seconds.toFixed(1)} s`;
    } catch (err) {
      answer.classList.add("error");
      answer.textContent = err.name === "AbortError" ? `${this.text} [stopped]` : String(err.message || err);
      answer.dataset.finish = "error";
    } finally {
      answer.classList.remove("streaming");
      answer.dataset.done = "true";
    }
  }

  // Mark the words of this answer that the base answer does not have; the text stays the same.
  highlightAgainst(baseText) {
    if (this.isBase || this.answer?.classList.contains("error") || baseText === undefined) return;
    const parts = Diff.diffWordsWithSpace(baseText, this.text);
    this.answer.replaceChildren(
      ...parts.filter((p) => !p.removed).map((p) => (p.added ? el("mark", { text: p.value }) : document.createTextNode(p.value))),
    );
    this.answer.dataset.same = String(baseText === this.text);
  }
}

export class Compare {
  constructor(models) {
    this.models = models;
    this.columns = new Map(); // model name -> Column
    this.unchosen = new Set(); // columns the person switched off; new adapters start switched on
    this.form = document.getElementById("compare-form");
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    document.getElementById("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) this.form.requestSubmit();
    });
    document.getElementById("clear").addEventListener("click", () => this.clear());
    document.getElementById("stop").addEventListener("click", () => this.controller?.abort());
    document.getElementById("mode").addEventListener("change", () => this.syncMode());
    models.listeners.push(() => this.render());
    this.syncMode();
  }

  syncMode() {
    document.getElementById("system-label").hidden = document.getElementById("mode").value !== "chat";
  }

  render() {
    const names = [this.models.base, ...this.models.adapters].filter(Boolean);
    const choice = document.getElementById("columns-choice");
    choice.replaceChildren(el("legend", { text: "Columns" }));
    for (const name of names) {
      const input = el("input", { type: "checkbox", value: name, name: "column" });
      input.checked = !this.unchosen.has(name);
      input.addEventListener("change", () => {
        if (input.checked) this.unchosen.delete(name);
        else this.unchosen.add(name);
        this.layout();
      });
      choice.append(el("label", { class: "check" }, input, ` ${name}`));
    }
    for (const name of [...this.columns.keys()]) if (!names.includes(name)) this.columns.delete(name);
    for (const name of names) if (!this.columns.has(name)) this.columns.set(name, new Column(name, name === this.models.base));
    this.layout();
  }

  selected() {
    return [...document.querySelectorAll("#columns-choice input:checked")].map((i) => i.value);
  }

  layout() {
    document.getElementById("columns").replaceChildren(...this.selected().map((name) => this.columns.get(name).node));
  }

  clear() {
    for (const [name] of this.columns) this.columns.set(name, new Column(name, name === this.models.base));
    document.getElementById("batch-note").textContent = "";
    this.layout();
  }

  async send() {
    const prompt = document.getElementById("prompt").value;
    const chosen = this.selected().map((name) => this.columns.get(name));
    if (!prompt.trim() || chosen.length === 0) return;
    const mode = document.getElementById("mode").value;
    const system = document.getElementById("system").value.trim();
    const settings = params();
    const send = document.getElementById("send");
    const stop = document.getElementById("stop");
    send.disabled = true;
    stop.disabled = false;
    this.controller = new AbortController();
    const before = await serverMetrics().catch(() => null);
    // Every column's request leaves in the same tick, so the server decodes them in one batch.
    await Promise.all(chosen.map((column) => column.send(prompt, system, mode, settings, this.controller.signal)));
    const base = chosen.find((column) => column.isBase);
    for (const column of chosen) column.highlightAgainst(base?.text);
    await this.noteBatch(before, chosen.length);
    send.disabled = false;
    stop.disabled = true;
  }

  // What the server's counters say about the batch these columns shared.
  async noteBatch(before, count) {
    const note = document.getElementById("batch-note");
    const after = await serverMetrics().catch(() => null);
    if (!before || !after) return;
    const steps = after.lorakit_decode_steps_total - before.lorakit_decode_steps_total;
    const rows = after.lorakit_decode_rows_total - before.lorakit_decode_rows_total;
    if (steps > 0) {
      note.textContent = `${count} column${count > 1 ? "s" : ""} decoded together: ${steps} decode steps, mean batch ${(rows / steps).toFixed(2)} rows`;
    }
  }

  show() {
    if (this.columns.size === 0 && this.models.base) this.render();
  }
}
