// Server: requests, queue, batch size, tokens/s and the adapter cache, from /metrics, sampled
// every two seconds while the view is open.

import { el, serverMetrics } from "./api.js";
import { LineChart } from "./charts.js";

const POLL_MS = 2000;
const KEEP = 300; // samples kept for the charts (ten minutes)

const CARDS = [
  ["requests finished", (m) => m.lorakit_requests_total],
  ["queue", (m) => m.lorakit_queue_depth],
  ["batch size", (m) => m.lorakit_batch_size],
  ["tokens/s", (m, rate) => rate.tokens.toFixed(1)],
  ["mean batch (last 2 s)", (m, rate) => rate.batch.toFixed(2)],
  ["tokens generated", (m) => m.lorakit_generation_tokens_total],
  ["prompt tokens", (m) => m.lorakit_prompt_tokens_total],
  ["adapters loaded", (m) => m.lorakit_adapters_loaded],
  ["adapters on device", (m) => m.lorakit_adapters_on_device],
  ["adapter cache hits", (m) => m.lorakit_adapter_cache_hits_total],
  ["adapter cache misses", (m) => m.lorakit_adapter_cache_misses_total],
  ["adapter evictions", (m) => m.lorakit_adapter_cache_evictions_total],
  ["rejected (queue full)", (m) => m.lorakit_rejected_requests_total],
];

export class Server {
  constructor() {
    this.samples = [];
    this.previous = null;
    this.timer = null;
    this.chart = null;
  }

  show() {
    if (!this.chart) {
      const box = document.getElementById("server-charts");
      this.chart = new LineChart(box, "tokens/s and batch size", ["tokens/s", "batch size"], { xLabel: "seconds (0 is now)" });
    }
    this.tick();
  }

  hide() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  async tick() {
    clearTimeout(this.timer);
    try {
      this.update(await serverMetrics(), performance.now() / 1000);
    } catch (err) {
      document.getElementById("server-cards").replaceChildren(el("p", { class: "error", text: String(err.message || err) }));
    }
    if (!document.getElementById("server").hidden) this.timer = setTimeout(() => this.tick(), POLL_MS);
  }

  update(metrics, now) {
    const rate = { tokens: 0, batch: 0 };
    if (this.previous) {
      const [before, then] = this.previous;
      const seconds = Math.max(now - then, 1e-3);
      rate.tokens = (metrics.lorakit_generation_tokens_total - before.lorakit_generation_tokens_total) / seconds;
      const steps = metrics.lorakit_decode_steps_total - before.lorakit_decode_steps_total;
      rate.batch = steps > 0 ? (metrics.lorakit_decode_rows_total - before.lorakit_decode_rows_total) / steps : 0;
    }
    this.previous = [metrics, now];
    document.getElementById("server-cards").replaceChildren(
      ...CARDS.map(([label, value]) =>
        el("div", { class: "card", "data-metric": label }, el("div", { class: "value", text: String(value(metrics, rate) ?? "-") }), el("div", { class: "muted", text: label })),
      ),
    );
    this.samples.push({ t: now, "tokens/s": rate.tokens, "batch size": metrics.lorakit_batch_size });
    this.samples = this.samples.slice(-KEEP);
    this.chart.setRows(this.samples.map((s) => ({ ...s, x: Math.round(s.t - now) })));
  }
}
