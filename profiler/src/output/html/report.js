// redis-stallprof's HTML report: draws the data of #report-data with Chart.js. Text goes into
// the page with textContent only; nothing is fetched.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const PALETTE = ["#e0663a", "#2458b3", "#2e9e5b", "#9b4dca", "#d4a017", "#17a2b8",
    "#c2185b", "#6d4c41", "#5c6bc0", "#7cb342", "#ff7043", "#546e7a"];
  const OTHER = "#9aa1ad";

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }
  // Text with `code` spans (the vocabulary's), as text nodes and <code> elements.
  function rich(text) {
    const span = el("span");
    String(text).split("`").forEach((part, i) => {
      if (part) span.appendChild(i % 2 ? el("code", part) : document.createTextNode(part));
    });
    return span;
  }
  function ms(us) { return us / 1000; }
  function duration(us) {
    if (us >= 1e6) return (us / 1e6).toFixed(2) + " s";
    if (us >= 1e3) return (us / 1e3).toFixed(1) + " ms";
    return us + " us";
  }
  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }
  function table(id, headers, rows, numeric) {
    const node = document.getElementById(id);
    if (!rows.length) {
      node.replaceWith(el("p", "None in this run.", "empty"));
      return null;
    }
    const head = el("tr");
    headers.forEach((h, i) => head.appendChild(el("th", h, numeric[i] ? "num" : "")));
    node.appendChild(head);
    rows.forEach(cells => {
      const row = el("tr");
      cells.forEach((cell, i) => {
        const td = el("td", null, numeric[i] ? "num" : "");
        if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell;
        row.appendChild(td);
      });
      node.appendChild(row);
    });
    return node;
  }

  // Times: seconds since the run's first record.
  const times = [];
  data.instances.forEach(i => {
    if (i.attached === null) return;
    times.push(i.attached);
    if (i.summary) times.push(i.attached + i.summary.duration_s);
  });
  [data.intervals, data.stalls, data.memory, data.census].forEach(list => list.forEach(p => times.push(p.t)));
  const start = times.length ? Math.min(...times) : 0;
  const rel = t => +(t - start).toFixed(3);
  // Every chart spans the whole run.
  const runEnd = times.length ? rel(Math.max(...times)) : 1;
  const xAxis = title => ({ type: "linear", min: 0, max: runEnd, title: { display: true, text: title } });
  const wallClock = t => new Date(t * 1000).toISOString().replace("T", " ").replace("Z", " UTC");

  // Origins' colours, heaviest cause first.
  const colours = {};
  data.causes.forEach(c => {
    if (!(c.origin in colours)) {
      const n = Object.keys(colours).length;
      colours[c.origin] = n < PALETTE.length ? PALETTE[n] : OTHER;
    }
  });
  const colour = origin => colours[origin] || OTHER;
  function swatch(origin) {
    const span = el("span");
    const box = el("span", null, "swatch");
    box.style.background = colour(origin);
    span.appendChild(box);
    span.appendChild(document.createTextNode(origin));
    return span;
  }

  // Run: the servers, most stalls first; past the first ten, behind a disclosure.
  const names = data.instances.map(i => i.label);
  const SHOWN_SERVERS = 10;
  document.getElementById("subtitle").textContent =
    (names.length === 0 ? "no server" : names.length <= 3 ? names.join(", ") : names.length + " servers") +
    (times.length ? " \u00b7 from " + wallClock(start) : "");
  const serverHeaders = ["server", "threshold", "iterations", "stalls", "p50", "p99", "p99.9", "max", "ran", "ended", "lost events"];
  const serverNumeric = [false, true, true, true, true, true, true, true, true, false, true];
  const serverRow = i => {
    const s = i.summary;
    return [i.label, duration(i.threshold_us), s ? s.iterations : "", s ? s.stalls : "",
      s ? duration(s.p50_us) : "", s ? duration(s.p99_us) : "", s ? duration(s.p999_us) : "",
      s ? duration(s.max_us) : "", s ? s.duration_s.toFixed(1) + " s" : "running", s ? s.stopped.replaceAll("_", " ") : "", s ? s.lost_events : ""];
  };
  const servers = table("instances", serverHeaders, data.instances.slice(0, SHOWN_SERVERS).map(serverRow), serverNumeric);
  if (servers && data.instances.length > SHOWN_SERVERS) {
    const more = el("details");
    more.appendChild(el("summary", (data.instances.length - SHOWN_SERVERS) + " more servers"));
    const rest = el("table");
    rest.id = "more-instances";
    more.appendChild(rest);
    servers.after(more);
    table("more-instances", serverHeaders, data.instances.slice(SHOWN_SERVERS).map(serverRow), serverNumeric);
  }
  const leftOut = [];
  if (data.left_out.servers) leftOut.push(data.left_out.servers + " records of servers past the report's " + data.instances.length + " are not listed here");
  if (data.left_out.stalls) leftOut.push(data.left_out.stalls + " stalls past the first " + data.stalls.length + " are not drawn (the causes table counts them)");
  if (data.left_out.points) leftOut.push(data.left_out.points + " points of long series are not drawn");
  if (data.left_out.client_addresses) leftOut.push(data.left_out.client_addresses + " census updates went to addresses past the report's limit");
  document.getElementById("left-out").textContent = leftOut.join("; ");

  const painted = {};
  function drawn(id, chart) {
    // Counts the pixels the chart painted, for the report's own test.
    const canvas = chart.canvas, context = canvas.getContext("2d");
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let count = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) count++;
    painted[id] = count;
    document.body.dataset.painted = JSON.stringify(painted);
  }
  const common = {
    animation: false, responsive: true, maintainAspectRatio: false,
    interaction: { mode: "nearest", intersect: true },
    plugins: { legend: { position: "bottom" } },
  };

  // Timeline: the interval lines of the (at most three) servers with most stalls.
  const LINED_SERVERS = 3;
  const lined = new Set(names.slice(0, LINED_SERVERS));
  const byInstance = {};
  data.intervals.filter(p => lined.has(p.instance))
    .forEach(p => (byInstance[p.instance] = byInstance[p.instance] || []).push(p));
  const datasets = [];
  const several = names.length > 1;
  if (names.length > LINED_SERVERS) {
    document.querySelector("#timeline-section .note").textContent +=
      " The lines are those of the " + LINED_SERVERS + " servers with most stalls; the marks are every server's.";
  }
  Object.entries(byInstance).forEach(([name, points]) => {
    const suffix = several ? " (" + name + ")" : "";
    datasets.push({ type: "line", label: "p99 per interval" + suffix, borderColor: "#8a92a3", backgroundColor: "#8a92a3",
      pointRadius: 0, borderWidth: 1.5, data: points.map(p => ({ x: rel(p.t), y: Math.max(ms(p.p99_us), 0.001) })) });
    datasets.push({ type: "line", label: "max per interval" + suffix, borderColor: "#1d2330", backgroundColor: "#1d2330",
      pointRadius: 0, borderWidth: 1, borderDash: [4, 3], data: points.map(p => ({ x: rel(p.t), y: Math.max(ms(p.max_us), 0.001) })) });
  });
  const stallsByOrigin = {};
  data.stalls.forEach(s => (stallsByOrigin[s.origin] = stallsByOrigin[s.origin] || []).push(s));
  Object.entries(stallsByOrigin).forEach(([origin, stalls]) => {
    datasets.push({ type: "scatter", label: origin, backgroundColor: colour(origin), borderColor: colour(origin),
      pointRadius: 5, pointHoverRadius: 8,
      data: stalls.map(s => ({ x: rel(s.t), y: ms(s.duration_us), stall: s })) });
  });
  const detailIds = new Set(data.details.map(d => d.id));
  function stallLines(s) {
    const lines = [s.duration + " " + s.origin + " / " + s.mechanism, s.instance + " at " + wallClock(s.t),
      "on CPU " + duration(s.on_cpu_us) + ", blocked " + duration(s.off_cpu_us) + ", waiting for a CPU " + duration(s.runqueue_us)];
    [s.client, s.waiting, s.madvise, s.accept].forEach(x => { if (x) lines.push(x); });
    if (s.incomplete) lines.push("samples were lost: times and stacks are lower bounds");
    return lines;
  }
  function select(s) {
    const card = document.getElementById("selected");
    card.replaceChildren();
    stallLines(s).forEach((line, i) => card.appendChild(el(i ? "div" : "strong", line)));
    if (detailIds.has(s.id)) {
      const link = el("a", "details and flamegraph");
      link.href = "#stall-" + s.id;
      card.appendChild(link);
    }
    card.hidden = false;
  }
  if (datasets.length) {
    const chart = new Chart(document.getElementById("timeline"), {
      data: { datasets },
      options: Object.assign({}, common, {
        scales: {
          x: xAxis("seconds since " + wallClock(start)),
          y: { type: "logarithmic", title: { display: true, text: "iteration (ms, log scale)" } },
        },
        plugins: {
          legend: { position: "bottom" },
          tooltip: { callbacks: {
            label: ctx => ctx.raw.stall ? stallLines(ctx.raw.stall) : ctx.dataset.label + ": " + ctx.parsed.y.toFixed(3) + " ms",
          } },
        },
        onClick: (_event, elements, chart) => {
          const hit = elements.map(e => chart.data.datasets[e.datasetIndex].data[e.index]).find(p => p.stall);
          if (hit) {
            select(hit.stall);
            if (detailIds.has(hit.stall.id)) highlight(hit.stall.id);
          }
        },
      }),
    });
    drawn("timeline", chart);
  } else {
    document.getElementById("timeline").replaceWith(el("p", "No interval or stall in this run.", "empty"));
  }

  // Causes.
  table("causes", ["origin", "mechanism", "stalls", "total", "max", "what it is", "what to do"],
    data.causes.map(c => [swatch(c.origin), c.mechanism, c.stalls, duration(c.total_us), duration(c.max_us), rich(c.meaning), rich(c.advice)]),
    [false, false, true, true, true, false, false]);

  // Stalls.
  table("stalls", ["time", "instance", "duration", "origin", "mechanism", "client", "held up"],
    data.stalls.map(s => {
      let time = wallClock(s.t);
      if (detailIds.has(s.id)) {
        const link = el("a", time);
        link.href = "#stall-" + s.id;
        time = link;
      }
      return [time, s.instance, s.duration, swatch(s.origin), s.mechanism, s.client, s.waiting];
    }), [false, false, true, false, false, false, false]);

  // The heaviest stalls.
  const marks = {};
  data.stalls.forEach(s => { marks[s.id] = s; });
  const details = document.getElementById("details");
  if (!data.details.length) details.appendChild(el("p", "No stall in this run.", "empty"));
  data.details.forEach(d => {
    const box = el("div", null, "detail");
    box.id = "stall-" + d.id;
    const s = marks[d.id];
    const lines = s ? stallLines(s) : ["stall " + d.id];
    box.appendChild(el("h3", lines[0]));
    lines.slice(1).forEach(line => box.appendChild(el("div", line)));
    const breakdown = el("table");
    const head = el("tr");
    ["origin", "mechanism", "time", "share"].forEach((h, i) => head.appendChild(el("th", h, i > 1 ? "num" : "")));
    breakdown.appendChild(head);
    d.breakdown.forEach(b => {
      const row = el("tr");
      row.appendChild(el("td", b.origin));
      row.appendChild(el("td", b.mechanism));
      row.appendChild(el("td", duration(b.us), "num"));
      row.appendChild(el("td", (100 * b.share).toFixed(0) + " %", "num"));
      breakdown.appendChild(row);
    });
    box.appendChild(breakdown);
    if (d.flamegraph.startsWith("data:image/svg+xml;base64,")) {
      const image = el("img");
      image.alt = "flamegraph of the stall";
      image.src = d.flamegraph;
      box.appendChild(image);
    }
    details.appendChild(box);
  });
  function highlight(id) {
    document.querySelectorAll(".detail.highlight").forEach(n => n.classList.remove("highlight"));
    const box = document.getElementById("stall-" + id);
    if (box) { box.classList.add("highlight"); box.scrollIntoView({ behavior: "smooth", block: "start" }); }
  }

  // Memory growth.
  if (data.memory.length) {
    const origins = [...new Set(data.memory.flatMap(p => Object.keys(p.growth)))];
    const memorySets = origins.map(origin => ({
      type: "bar", label: origin, stack: "growth", yAxisID: "y", backgroundColor: colour(origin),
      data: data.memory.map(p => ({ x: rel(p.t), y: (p.growth[origin] || 0) / 1048576 })),
    }));
    memorySets.push({ type: "line", label: "resident", yAxisID: "resident", borderColor: "#1d2330", backgroundColor: "#1d2330",
      pointRadius: 2, data: data.memory.map(p => ({ x: rel(p.t), y: p.resident_bytes / 1048576 })) });
    const chart = new Chart(document.getElementById("memory"), {
      data: { datasets: memorySets },
      options: Object.assign({}, common, { scales: {
        x: Object.assign(xAxis("seconds"), { stacked: true }),
        y: { stacked: true, title: { display: true, text: "growth (MiB)" } },
        resident: { position: "right", title: { display: true, text: "resident (MiB)" }, grid: { drawOnChartArea: false } },
      } }),
    });
    drawn("memory", chart);
  } else {
    document.getElementById("memory").replaceWith(el("p", "No memory report in this run (--no-memory, or shorter than an interval).", "empty"));
  }

  // Connections.
  if (data.census.length) {
    const chart = new Chart(document.getElementById("census"), {
      data: { datasets: [
        { type: "line", label: "established", yAxisID: "y", borderColor: "#2458b3", backgroundColor: "#2458b3", pointRadius: 2,
          data: data.census.map(p => ({ x: rel(p.t), y: p.established })) },
        { type: "bar", label: "opened", yAxisID: "y", backgroundColor: "#2e9e5b", data: data.census.map(p => ({ x: rel(p.t), y: p.opened })) },
        { type: "bar", label: "closed", yAxisID: "y", backgroundColor: "#e0663a", data: data.census.map(p => ({ x: rel(p.t), y: p.closed })) },
      ] },
      options: Object.assign({}, common, { scales: {
        x: xAxis("seconds"),
        y: { beginAtZero: true, title: { display: true, text: "connections" } },
      } }),
    });
    drawn("census", chart);
  } else {
    document.getElementById("census").replaceWith(el("p", "No connection census in this run.", "empty"));
  }
  table("clients", ["client address", "opened", "closed", "most established"],
    data.clients.map(c => [c.addr, c.opened, c.closed, c.max_established]), [false, true, true, true]);

  // Accept-queue overflows.
  table("overflows", ["time", "instance", "port", "connections dropped", "longest queue", "limit", "during a stall"],
    data.overflows.map(o => [wallClock(o.t), o.instance, o.port === null ? "" : o.port, o.overflows, o.max_queue, o.limit, o.in_stall ? "yes" : "no"]),
    [false, false, true, true, true, true, false]);

  // Lost events.
  const lostNote = el("p", "Events the kernel or the profiler could not keep. A stall that lost samples says so " +
    "(its times and stacks are then lower bounds); iterations are never lost silently: every count is here.", "note");
  document.getElementById("lost").before(lostNote);
  table("lost", ["instance", "events", "what was lost"],
    data.lost.map(l => [l.instance || "the run", l.count, l.meaning]), [false, true, false]);
  document.body.dataset.renderMs = String(Math.round(performance.now()));
  document.body.dataset.ready = "yes";
})();
