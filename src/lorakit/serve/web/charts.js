// Line charts over a shared x axis (uPlot, vendored); a chart is redrawn in place as rows arrive.

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

const COMPACT = new Intl.NumberFormat("en", { notation: "compact", maximumSignificantDigits: 3 });

// 3.0e-4 rather than uPlot's rounding to 0; 19.5M bytes rather than a clipped 19500000.
function tick(v) {
  if (v === 0 || v === null) return v;
  if (Math.abs(v) < 0.01) return v.toExponential(1);
  return Math.abs(v) >= 1e4 ? COMPACT.format(v) : String(Number(v.toPrecision(4)));
}

export class LineChart {
  // `series`: the y keys to draw; a key missing from a row leaves a gap that the line spans.
  constructor(container, title, series, { xLabel = "step", points = false } = {}) {
    this.series = series;
    this.figure = document.createElement("figure");
    this.figure.className = "chart";
    this.figure.dataset.title = title;
    container.append(this.figure);
    // Two charts a row where the page is wide enough.
    const width = Math.max(320, Math.min(640, Math.floor((container.clientWidth || 1000) / 2) - 24));
    this.plot = new uPlot(
      {
        title,
        width,
        height: 220,
        scales: { x: { time: false } },
        axes: [{ label: xLabel }, { size: 64, values: (u, splits) => splits.map(tick) }],
        series: [
          { label: xLabel },
          ...series.map((key, i) => ({
            label: key,
            stroke: COLORS[i % COLORS.length],
            width: 2,
            spanGaps: true,
            points: { show: points || key.startsWith("eval") },
          })),
        ],
      },
      [[], ...series.map(() => [])],
      this.figure,
    );
  }

  // rows: [{x, key: value, ...}] in x order.
  setRows(rows) {
    const data = [rows.map((r) => r.x), ...this.series.map((key) => rows.map((r) => (typeof r[key] === "number" ? r[key] : null)))];
    this.plot.setData(data);
    this.figure.dataset.points = String(rows.filter((r) => this.series.some((k) => typeof r[k] === "number")).length);
  }

  destroy() {
    this.plot.destroy();
    this.figure.remove();
  }
}
