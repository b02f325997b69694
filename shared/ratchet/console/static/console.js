// The review console's only script, written for it: small conveniences on pages that work
// without it. Pages that show live data mark it with data-live-src (the URL of its fragment,
// which the server renders and escapes); a change event from the server (server-sent events on
// /events) refreshes those elements. data-live-change limits an element to one change's events.
(function () {
  "use strict";

  var regions = Array.prototype.slice.call(document.querySelectorAll("[data-live-src]"));
  var status = document.querySelector("[data-live-status]");
  if (regions.length === 0 || !window.EventSource || !window.fetch) {
    return;
  }
  var pending = {};

  function say(text) {
    if (status) {
      status.textContent = text;
    }
  }

  function refresh(region) {
    fetch(region.getAttribute("data-live-src"), {
      credentials: "same-origin",
      headers: { "Accept": "text/html" }
    }).then(function (response) {
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      return response.text();
    }).then(function (html) {
      // the fragment is the server's own escaped HTML, never text from the event
      region.innerHTML = html;
      say("Live: updated at " + new Date().toLocaleTimeString() + ".");
    }).catch(function () {
      say("Live updates paused: reload the page.");
    });
  }

  function later(index) {
    // several events arrive for one step (the decision, its record): refresh once
    if (pending[index]) {
      return;
    }
    pending[index] = window.setTimeout(function () {
      pending[index] = null;
      refresh(regions[index]);
    }, 300);
  }

  var source = new EventSource("/events");
  source.addEventListener("open", function () {
    say("Live: this page follows new changes.");
  });
  source.addEventListener("error", function () {
    say("Live updates interrupted; retrying.");
  });
  source.addEventListener("change", function (event) {
    var data;
    try {
      data = JSON.parse(event.data);
    } catch (e) {
      return;
    }
    regions.forEach(function (region, index) {
      var only = region.getAttribute("data-live-change");
      if (!only || only === data.change_id) {
        later(index);
      }
    });
  });
})();

