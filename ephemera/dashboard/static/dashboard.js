// The dashboard's only script (served from its own origin; the Content-Security-Policy allows no
// other). The list follows the server's event stream: on each change it fetches its rows again,
// rendered and escaped by the server, so the page never builds HTML from data itself.
"use strict";

(function () {
  function age(seconds) {
    const units = [["d", 86400], ["h", 3600], ["m", 60]];
    for (const [unit, size] of units) {
      if (seconds >= 2 * size) return Math.floor(seconds / size) + unit;
    }
    return Math.max(0, Math.floor(seconds)) + "s";
  }

  function refreshAges() {
    const now = Date.now();
    document.querySelectorAll("time[data-age]").forEach(function (el) {
      const then = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(then)) el.textContent = age((now - then) / 1000);
    });
  }

  function follow(rows) {
    const live = document.getElementById("live");
    let busy = false;
    let again = false;

    function state(text) {
      if (live) {
        live.textContent = text;
        live.dataset.state = text;
      }
    }

    async function refresh(version) {
      if (busy) {
        again = true;
        return;
      }
      busy = true;
      try {
        const answer = await fetch(rows.dataset.src, { headers: { Accept: "text/html" }, cache: "no-store" });
        if (answer.ok) {
          rows.innerHTML = await answer.text();
          if (version) rows.dataset.version = version;
          refreshAges();
        }
      } finally {
        busy = false;
        if (again) {
          again = false;
          refresh(rows.dataset.version);
        }
      }
    }

    const source = new EventSource("/events");
    source.addEventListener("open", function () { state("live"); });
    source.addEventListener("error", function () { state("reconnecting"); });
    // The first message after each (re)connection says the current version: changes missed while
    // disconnected are caught up then.
    source.addEventListener("changed", function (event) {
      if (event.data !== rows.dataset.version) refresh(event.data);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const rows = document.getElementById("rows");
    if (rows && window.EventSource) follow(rows);
    document.querySelectorAll("form.filters select").forEach(function (select) {
      select.addEventListener("change", function () { select.form.submit(); });
    });
    refreshAges();
    setInterval(refreshAges, 5000);
  });
})();
