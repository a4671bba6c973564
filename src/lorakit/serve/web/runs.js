// Runs: the training output directories given to `lorakit serve --runs`. Loss, eval loss,
// learning rate and every other logged number from metrics.jsonl, redrawn as a run writes
// more; the samples and the compare report where the run has them.

import { ApiError, api, el, formatBytes } from "./api.js";
import { LineChart } from "./charts.js";

const POLL_MS = 2000;
const NOT_PLOTTED = new Set(["step", "epoch"]);

function runPath(run, what) {
  return `/v1/runs/${run.split("/").map(encodeURIComponent).join("/")}/${what}`;
}

export class Runs {
  constructor() {
    this.runs = [];
    this.current = null;
    this.timer = null;
  }

  show() {
    this.tick();
  }

  hide() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  async tick() {
    clearTimeout(this.timer);
    try {
      await this.refreshList();
      if (this.current) await this.poll();
    } catch (err) {
      document.getElementById("run-status").textContent = err instanceof ApiError ? err.message : String(err);
    }
    if (!document.getElementById("runs").hidden) this.timer = setTimeout(() => this.tick(), POLL_MS);
  }

  async refreshList() {
    const data = await api("/v1/runs");
    this.runs = data.data;
    document.getElementById("runs-empty").hidden = this.runs.length > 0;
    const list = document.getElementById("run-list");
    list.replaceChildren(
      ...this.runs.map((run) => {
        const link = el("a", { href: "#runs", text: run.id, "data-run": run.id });
        link.classList.toggle("active", run.id === this.current?.id);
        link.addEventListener("click", (event) => {
          event.preventDefault();
          this.open(run.id);
        });
        return el("li", {}, link, el("div", { class: "muted small", text: run.path }));
      }),
    );
    if (!this.current && this.runs.length) await this.open(this.runs[0].id);
  }

  async open(id) {
    for (const chart of this.current?.charts.values() ?? []) chart.destroy();
    this.current = { id, offset: 0, rows: [], charts: new Map(), keys: "", skipped: 0, skippedBytes: 0 };
    document.getElementById("run-title").textContent = id;
    for (const link of document.querySelectorAll("#run-list a")) link.classList.toggle("active", link.dataset.run === id);
    document.getElementById("charts").replaceChildren();
    await this.poll();
    await this.showSamples(id);
    await this.showReport(id);
  }

  // New metrics.jsonl rows since the last offset; a rewritten file starts the plots over.
  // Lines the server passed over (not JSON, or too long to read) are counted across polls.
  async poll() {
    const run = this.current;
    const data = await api(`${runPath(run.id, "metrics")}?offset=${run.offset}`);
    if (run !== this.current) return;
    if (data.reset) Object.assign(run, { rows: [], skipped: 0, skippedBytes: 0 });
    run.rows.push(...data.rows.filter((r) => typeof r.step === "number"));
    run.offset = data.offset;
    run.skipped += data.skipped ?? 0;
    run.skippedBytes += data.skipped_bytes ?? 0;
    const last = run.rows[run.rows.length - 1];
    const passed = run.skippedBytes ? ` (${formatBytes(run.skippedBytes)} in lines too long to read)` : "";
    const status = data.exists
      ? `${run.rows.length} records${last ? `, last at step ${last.step}` : ""}${run.skipped ? `, ${run.skipped} lines skipped${passed}` : ""}`
      : "no metrics.jsonl yet";
    document.getElementById("run-status").textContent = status;
    this.draw(run);
  }

  draw(run) {
    const numeric = new Set();
    for (const row of run.rows) for (const [k, v] of Object.entries(row)) if (typeof v === "number" && !NOT_PLOTTED.has(k)) numeric.add(k);
    const groups = [];
    const loss = ["loss", "eval_loss"].filter((k) => numeric.has(k));
    if (loss.length) groups.push(["loss", loss]);
    if (numeric.has("lr")) groups.push(["learning rate", ["lr"]]);
    for (const key of [...numeric].sort()) if (!["loss", "eval_loss", "lr"].includes(key)) groups.push([key, [key]]);
    const keys = JSON.stringify(groups);
    if (keys !== run.keys) {
      for (const chart of run.charts.values()) chart.destroy();
      run.charts = new Map(groups.map(([title, series]) => [title, new LineChart(document.getElementById("charts"), title, series)]));
      run.keys = keys;
    }
    const rows = run.rows.map((r) => ({ ...r, x: r.step }));
    for (const chart of run.charts.values()) chart.setRows(rows);
  }

  async showSamples(id) {
    const box = document.getElementById("samples");
    box.replaceChildren();
    const data = await api(runPath(id, "samples"));
    if (!data.exists || data.rows.length === 0) return;
    const keys = [...new Set(data.rows.flatMap((r) => Object.keys(r)))];
    const text = (v) => (typeof v === "string" ? v : JSON.stringify(v, null, 1));
    const table = el(
      "table",
      { class: "samples" },
      el("thead", {}, el("tr", {}, ...keys.map((k) => el("th", { text: k })))),
      el("tbody", {}, ...data.rows.map((r) => el("tr", {}, ...keys.map((k) => el("td", {}, el("pre", { text: r[k] === undefined ? "" : text(r[k]) })))))),
    );
    const notes = [];
    if (data.total > data.rows.length) notes.push(`the last ${data.rows.length} of ${data.total} read`);
    if (data.skipped_bytes) notes.push(`the first ${formatBytes(data.skipped_bytes)} of samples.jsonl not read`);
    if (data.skipped) notes.push(`${data.skipped} unreadable lines skipped`);
    const shown = notes.length ? ` (${notes.join("; ")})` : "";
    box.append(el("h3", { text: `Samples${shown}` }), table);
  }

  async showReport(id) {
    const box = document.getElementById("report");
    box.replaceChildren();
    let report;
    try {
      report = await api(runPath(id, "report"));
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return;
      throw err;
    }
    box.append(el("h3", { text: "Compare report" }));
    if (typeof report === "string") {
      const frame = el("iframe", { sandbox: "", title: "compare report" });
      frame.srcdoc = report;
      box.append(frame);
    } else {
      box.append(el("pre", { text: JSON.stringify(report, null, 2) }));
    }
  }
}
