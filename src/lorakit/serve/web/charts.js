// Line charts over a shared x axis (uPlot, vendored); a chart is redrawn in place as rows arrive.

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

export class LineChart {
  // `series`: the y keys to draw; a key missing from a row leaves a gap that the line spans.
  constructor(container, title, series, { xLabel = "step", points = false } = {}) {
    this.series = series;
    this.figure = document.createElement("figure");
    this.figure.className = "chart";
    this.figure.dataset.title = title;
    container.append(this.figure);
    const width = Math.max(280, Math.min(560, container.clientWidth - 16 || 480));
    this.plot = new uPlot(
      {
        title,
        width,
        height: 220,
        scales: { x: { time: false } },
        axes: [{ label: xLabel }, { size: 60 }],
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
