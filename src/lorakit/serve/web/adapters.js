// Adapters: what is loaded (rank, targets, size, base model, saved chat template, and
// `lorakit check`'s verdict for vLLM, SGLang, llama.cpp and PEFT); load one
// from a directory on the server and unload it through POST / DELETE /v1/adapters.

import { api, el, formatBytes } from "./api.js";

export class Adapters {
  constructor(models) {
    this.models = models;
    this.status = document.getElementById("adapter-status");
    document.getElementById("load-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.load();
    });
    models.listeners.push(() => this.refresh());
  }

  say(text, error = false) {
    this.status.textContent = text;
    this.status.classList.toggle("error", error);
  }

  async refresh() {
    let data;
    try {
      data = await api("/v1/adapters");
    } catch (err) {
      this.say(`Could not list adapters: ${err.message}`, true);
      return;
    }
    const body = document.querySelector("#adapter-table tbody");
    body.replaceChildren(...data.data.map((a) => this.row(a)));
    document.getElementById("adapter-empty").hidden = data.data.length > 0;
  }

  row(adapter) {
    const unload = el("button", { type: "button", class: "quiet danger", text: "Unload", "data-unload": adapter.id });
    unload.addEventListener("click", () => this.unload(adapter.id));
    const targets = Array.isArray(adapter.target_modules) ? adapter.target_modules.join(", ") : adapter.target_modules ?? "";
    const template = adapter.chat_template
      ? el("details", {}, el("summary", { text: "saved" }), el("pre", { text: adapter.chat_template }))
      : el("span", { class: "muted", text: "none saved" });
    // Files that link out of the adapter's directory: the server does not read them.
    const refused = adapter.refused?.length
      ? [el("div", { class: "error small", text: `not read (links out of the directory): ${adapter.refused.join(", ")}` })]
      : [];
    const cells = [
      el("td", {}, el("strong", { text: adapter.id }), el("div", { class: "muted small", text: adapter.path }), ...refused),
      el("td", { text: String(adapter.r ?? "") }),
      el("td", { text: String(adapter.lora_alpha ?? "") }),
      el("td", { class: "small", text: targets }),
      el("td", { text: formatBytes(adapter.size_bytes) }),
      el("td", { class: "small", text: adapter.base_model ?? "" }),
      el("td", {}, template),
      el("td", { class: "small" }, ...verdicts(adapter.check)),
      el("td", {}, unload),
    ];
    return el("tr", { "data-adapter": adapter.id }, ...cells);
  }

  async load() {
    const name = document.getElementById("load-name").value.trim();
    const path = document.getElementById("load-path").value.trim();
    const button = document.getElementById("load");
    button.disabled = true;
    this.say(`Loading ${name} ...`);
    try {
      await api("/v1/adapters", { method: "POST", body: { name, path } });
      this.say(`Loaded ${name}.`);
      document.getElementById("load-name").value = "";
      await this.models.refresh();
    } catch (err) {
      this.say(`Could not load ${name}: ${err.message}`, true);
    } finally {
      button.disabled = false;
    }
  }

  async unload(name) {
    this.say(`Unloading ${name} ...`);
    try {
      await api(`/v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
      this.say(`Unloaded ${name}.`);
      await this.models.refresh();
    } catch (err) {
      this.say(`Could not unload ${name}: ${err.message}`, true);
    }
  }
}

// One line per serving target: its verdict, with the failed rules and the serving command
// in the tooltip (and listed under it when the target refuses or warns).
function verdicts(check) {
  if (!Array.isArray(check)) {
    return [el("span", { class: "muted", text: check ?? "not checked" })];
  }
  return check.map((v) => {
    const tip = [...v.reasons, v.command ? `serve it: ${v.command}` : ""].filter(Boolean).join("\n");
    const line = el("div", { "data-target": v.target, title: tip },
      el("strong", { text: `${v.target}: ` }),
      el("span", { class: v.verdict === "refused" ? "error" : "", text: v.verdict }));
    if (v.reasons.length && v.verdict !== "loads and acts") {
      line.append(el("div", { class: "muted", text: v.reasons.join("; ") }));
    }
    return line;
  });
}
