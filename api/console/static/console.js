// Conveyor console: refreshes each page's live part (#live) every few seconds.
// Plain JavaScript with no dependency, served by the API itself: works offline.
//
// LIVE UPDATES HOOK: when the tenant event stream lands (GET /v1/events/stream, SSE), open
// one EventSource here and call refresh() on each transition instead of polling on a timer;
// the server side already renders a page's live part alone for the X-Console-Fragment header.
"use strict";

(function () {
  const live = document.getElementById("live");
  if (!live || !live.dataset.refresh) return;
  const seconds = Math.max(1, Number(live.dataset.refresh) || 5);

  // Leave the page alone while someone is choosing or typing in it.
  function busy() {
    if (live.contains(document.activeElement) && document.activeElement !== document.body) {
      return true;
    }
    return live.querySelector("input[type=checkbox]:checked") !== null;
  }

  async function refresh() {
    if (document.hidden || busy()) return;
    try {
      const answer = await fetch(window.location.href, {
        headers: { "X-Console-Fragment": "1" },
        credentials: "same-origin",
        cache: "no-store",
      });
      // Signed out meanwhile (a redirect to the sign-in page): show it whole.
      if (answer.redirected || answer.status === 401) {
        window.location.reload();
        return;
      }
      if (!answer.ok) return;
      const html = await answer.text();
      if (!busy()) {
        live.innerHTML = html;
        live.dataset.refreshedAt = new Date().toISOString();
      }
    } catch (error) {
      // The API is unreachable for a moment: try again at the next tick.
    }
  }

  window.conveyorConsole = { refresh: refresh };
  window.setInterval(refresh, seconds * 1000);
})();
