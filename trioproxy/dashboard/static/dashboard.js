// trioproxy dashboard: the live parts only (countdowns, copy buttons, the live page's
// event stream, usage charts). Every page works without it, but for those.
"use strict";

(function () {
  // Seconds the server's clock is ahead of this browser's (set from data-server-now).
  let skew = 0;

  function span(seconds) {
    let left = Math.max(0, Math.round(seconds));
    const units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
    const parts = [];
    for (const [name, size] of units) {
      if (left >= size || (name === "s" && parts.length === 0)) {
        parts.push(Math.floor(left / size) + name);
        left %= size;
      }
      if (parts.length === 2) break;
    }
    return parts.join(" ");
  }

  function tickCountdowns() {
    const now = Date.now() / 1000 + skew;
    for (const el of document.querySelectorAll("[data-countdown]")) {
      const at = parseFloat(el.dataset.countdown);
      if (isNaN(at)) continue;
      const left = at - now;
      el.textContent = left > 0 ? "in " + span(left) : "now";
    }
  }

  function readSkew(root) {
    const holder = root.querySelector ? root.querySelector("[data-server-now]") : null;
    const el = holder || (root.dataset && root.dataset.serverNow ? root : null);
    if (el) skew = parseFloat(el.dataset.serverNow) - Date.now() / 1000;
  }

  async function copy(button) {
    const target = document.querySelector(button.dataset.copy);
    if (!target) return;
    const text = target.textContent;
    let done = false;
    try {
      await navigator.clipboard.writeText(text);
      done = true;
    } catch (e) {
      // plain http from another machine has no clipboard API: select and copy instead
      const range = document.createRange();
      range.selectNodeContents(target);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      done = document.execCommand && document.execCommand("copy");
    }
    const note = button.parentElement.querySelector(".copied") || document.createElement("span");
    note.className = "copied";
    note.setAttribute("role", "status");
    note.textContent = done ? "Copied" : "Select and copy it by hand";
    button.after(note);
  }

  function liveStream() {
    const panel = document.getElementById("live-panel");
    if (!panel || !window.EventSource) return;
    const source = new EventSource(panel.dataset.events);
    source.addEventListener("snapshot", (event) => {
      panel.innerHTML = event.data;
      panel.dataset.updates = String(parseInt(panel.dataset.updates || "0", 10) + 1);
    });
    window.addEventListener("pagehide", () => source.close());
  }

  const formats = {
    requests: (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)),
    tokens: (v) => (v >= 1e6 ? (v / 1e6).toFixed(1) + "M" : v >= 1e3 ? (v / 1e3).toFixed(1) + "k" : String(Math.round(v))),
    cost_usd: (v) => "$" + (v >= 1 ? v.toFixed(2) : v.toFixed(4)),
  };

  function charts() {
    const holder = document.getElementById("usage-data");
    if (!holder || !window.uPlot) return;
    const data = JSON.parse(holder.textContent);
    const dark = window.matchMedia("(prefers-color-scheme: dark)").matches;
    const palette = ["#2457c5", "#1f8a4c", "#c0392b", "#b7791f", "#7b3fc4", "#127a8a", "#d0568a", "#5b6576"];
    const axisColor = dark ? "#9aa4b4" : "#5b6576";
    const gridColor = dark ? "#2d3542" : "#e3e6ec";
    const plots = [];
    for (const chart of data.charts) {
      const el = document.getElementById("chart-" + chart.metric);
      if (!el) continue;
      const series = [{}];
      chart.series.forEach((s, i) => {
        const color = palette[i % palette.length];
        series.push({ label: s.label, stroke: color, fill: color + "22", width: 2, points: { show: chart.times.length < 40 } });
      });
      const axis = { stroke: axisColor, grid: { stroke: gridColor, width: 1 }, ticks: { stroke: gridColor } };
      const format = formats[chart.metric] || formats.requests;
      series.slice(1).forEach((s) => { s.value = (u, v) => (v == null ? "-" : format(v)); });
      const options = {
        width: Math.max(280, el.clientWidth),
        height: 240,
        series: series,
        axes: [axis, Object.assign({}, axis, { size: 70, values: (u, splits) => splits.map(format) })],
        scales: { x: { time: true } },
        tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
        legend: { live: true },
      };
      const values = [chart.times].concat(chart.series.map((s) => s.values));
      plots.push([el, new uPlot(options, values, el)]);
    }
    window.addEventListener("resize", () => {
      for (const [el, plot] of plots) plot.setSize({ width: Math.max(280, el.clientWidth), height: 240 });
    });
  }

  function init(root) {
    readSkew(root);
    tickCountdowns();
    for (const button of root.querySelectorAll ? root.querySelectorAll("[data-copy]") : []) {
      if (button.dataset.bound) continue;
      button.dataset.bound = "1";
      button.addEventListener("click", () => copy(button));
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    init(document);
    setInterval(tickCountdowns, 1000);
    liveStream();
    charts();
    // content swapped in by htmx (the pool table, a login's state)
    document.body.addEventListener("htmx:load", (event) => init(event.target));
  });
})();
