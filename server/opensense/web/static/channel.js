// OpenSense channel page: the chart (uPlot, vendored in /static/vendor/uplot/).
// Without this script the page shows the same data as a table.
(function () {
  "use strict";
  var el = document.getElementById("chart");
  if (!el || !window.uPlot || !window.fetch) return;

  function stepAt(steps, t) {
    var v = null;
    for (var i = 0; i < steps.length && steps[i][0] <= t; i++) v = steps[i][1];
    return v;
  }

  // The limits are step lines over the whole range, whatever buckets there are: their
  // points are the buckets' times, the range's ends and each change of a limit. At a
  // point that is not a bucket the readings' series hold `undefined`, which uPlot
  // steps over (a `null` from the server is a missing bucket and stays a gap). With
  // the buckets' times alone, a chart of one bucket (a channel minutes old) or of
  // buckets older than the rule drew no limit at all.
  function points(d) {
    var seen = {}, xs = [];
    function add(t) { if (!seen[t]) { seen[t] = true; xs.push(t); } }
    d.x.forEach(add);
    if (d.thresholds.length) {
      add(d.from);
      add(d.to);
      d.thresholds.forEach(function (th) {
        th.steps.forEach(function (s) { if (s[0] > d.from && s[0] < d.to) add(s[0]); });
      });
    }
    xs.sort(function (a, b) { return a - b; });
    return xs;
  }

  function draw(d) {
    var unit = el.getAttribute("data-unit") || "";
    var xs = points(d), at = {};
    d.x.forEach(function (t, i) { at[t] = i; });
    function column(values) {
      return xs.map(function (t) { return t in at ? values[at[t]] : undefined; });
    }
    var data = [xs, column(d.mean), column(d.min), column(d.max)];
    var series = [
      {},
      { label: "mean", stroke: "#1f5fa8", width: 2, value: fmt },
      { label: "min", stroke: "#7aa6d6", width: 1, value: fmt },
      { label: "max", stroke: "#7aa6d6", width: 1, value: fmt },
    ];
    d.thresholds.forEach(function (th) {
      data.push(xs.map(function (t) { return stepAt(th.steps, t); }));
      // a limit is a line, not readings: no point markers (uPlot draws one at every x
      // where there is room, so a limit over a few hours of buckets was a row of circles)
      series.push({ label: th.label, stroke: "#b3261e", width: 1, dash: [6, 4], value: fmt,
        paths: uPlot.paths.stepped({ align: 1 }), points: { show: false } });
    });
    function fmt(u, v) { return v == null ? "–" : v.toFixed(1) + " " + unit; }
    var opts = {
      width: Math.max(300, el.clientWidth),
      height: 260,
      series: series,
      scales: { x: { time: true, range: [d.from, d.to] } },
      axes: [{}, { label: unit }],
      hooks: {
        drawClear: [function (u) {
          // alarm periods as bands behind the lines
          var ctx = u.ctx;
          ctx.save();
          ctx.fillStyle = "rgba(179, 38, 30, 0.15)";
          d.bands.forEach(function (b) {
            var x0 = u.valToPos(b.from, "x", true), x1 = u.valToPos(b.to, "x", true);
            ctx.fillRect(x0, u.bbox.top, Math.max(1, x1 - x0), u.bbox.height);
          });
          ctx.restore();
        }],
      },
    };
    el.textContent = "";
    var plot = new uPlot(opts, data, el);
    window.addEventListener("resize", function () {
      plot.setSize({ width: Math.max(300, el.clientWidth), height: 260 });
    });
    var table = document.querySelector("details.data-table");
    if (table) table.open = false; // the chart shows it; the table stays one tap away
  }

  fetch(el.getAttribute("data-src"), { credentials: "same-origin" })
    .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
    .then(draw)
    .catch(function () { el.textContent = "The chart could not be loaded; the table below has the data."; });
})();
