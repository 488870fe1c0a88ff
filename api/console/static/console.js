// Conveyor console: keeps each page's live part (#live) current.
// Plain JavaScript with no dependency, served by the API itself: works offline.
//
// The page listens to its event stream (data-stream: the tenant's transitions, or one job's
// transitions and progress) and refreshes its live part after each event, at most once a
// second. Only while no stream is open does a timer refresh it every data-refresh seconds.
"use strict";

(function () {
  const live = document.getElementById("live");
  if (!live || !live.dataset.refresh) return;
  const seconds = Math.max(1, Number(live.dataset.refresh) || 5);
  const finalStates = (live.dataset.finalStates || "").split(" ").filter(Boolean);
  const GAP_MS = 1000;
  let timer = null;
  let pending = null;
  let last = 0;

  // Leave the page alone while someone is choosing or typing in it.
  function busy() {
    if (live.contains(document.activeElement) && document.activeElement !== document.body) {
      return true;
    }
    return live.querySelector("input[type=checkbox]:checked") !== null;
  }

  // Returns false when the page could not be refreshed now (hidden, busy, unreachable).
  async function refresh() {
    if (document.hidden || busy()) return false;
    last = Date.now();
    try {
      const answer = await fetch(window.location.href, {
        headers: { "X-Console-Fragment": "1" },
        credentials: "same-origin",
        cache: "no-store",
      });
      // Signed out meanwhile (a redirect to the sign-in page): show it whole.
      if (answer.redirected || answer.status === 401) {
        window.location.reload();
        return true;
      }
      if (!answer.ok) return false;
      const html = await answer.text();
      if (busy()) return false;
      live.innerHTML = html;
      live.dataset.refreshedAt = new Date().toISOString();
      return true;
    } catch (error) {
      return false; // the API is unreachable for a moment
    }
  }

  // Refresh soon after an event; events close together make one refresh.
  function soon() {
    if (pending !== null) return;
    const wait = Math.max(0, last + GAP_MS - Date.now());
    pending = window.setTimeout(async function () {
      pending = null;
      if (!(await refresh()) && timer === null) {
        soon(); // not now (busy, hidden): the change is still to be shown
      }
    }, wait);
  }

  function startTimer() {
    if (timer === null) timer = window.setInterval(refresh, seconds * 1000);
  }

  function stopTimer() {
    if (timer !== null) window.clearInterval(timer);
    timer = null;
  }

  function listen(url) {
    const source = new EventSource(url);
    source.addEventListener("open", function () {
      live.dataset.streamOpen = "1";
      stopTimer();
      soon(); // what changed while the stream was down
    });
    source.addEventListener("error", function () {
      // EventSource reconnects by itself (resuming from Last-Event-ID); the timer covers the gap.
      delete live.dataset.streamOpen;
      startTimer();
    });
    source.addEventListener("progress", function (event) {
      live.dataset.lastEvent = event.lastEventId;
      soon();
    });
    source.addEventListener("state", function (event) {
      live.dataset.lastEvent = event.lastEventId;
      soon();
      let state = null;
      try {
        state = JSON.parse(event.data).state;
      } catch (error) {
        return;
      }
      if (finalStates.includes(state)) {
        // A job's stream ends with its job: the page has nothing more to wait for.
        source.close();
        delete live.dataset.streamOpen;
        startTimer();
      }
    });
  }

  window.conveyorConsole = { refresh: refresh };
  if (live.dataset.stream && window.EventSource) {
    listen(live.dataset.stream);
  } else {
    startTimer();
  }
})();
