// OpenSense overview: live cards by Server-Sent Events (docs/dashboard.md, "Live
// updates"). The page is complete without this script; it only keeps it current.
(function () {
  "use strict";
  var board = document.querySelector("[data-live]");
  if (!board || !window.EventSource) return;
  var status = document.getElementById("live-status");

  function say(text) {
    if (!status) return;
    status.textContent = text;
    status.hidden = !text;
  }

  function field(root, name) {
    return root.querySelector('[data-f="' + name + '"]');
  }

  function setText(root, name, text) {
    var el = field(root, name);
    if (el && el.textContent !== text) el.textContent = text;
    return el;
  }

  function updateDevice(d) {
    var sec = board.querySelector('[data-device="' + d.id + '"]');
    if (!sec) return;
    setText(sec, "health", d.health);
    var off = setText(sec, "offline", d.offline ? "Device offline (" + d.offline + ")" : "");
    if (off) off.hidden = !d.offline;
    sec.classList.toggle("is-offline", !!d.offline);
  }

  function updateCard(c) {
    var li = board.querySelector('[data-channel="' + c.id + '"]');
    if (!li) return false;
    li.className = "state-" + c.css;
    setText(li, "status", c.status);
    setText(li, "value", c.value);
    setText(li, "age", c.age);
    var open = setText(li, "open", c.open + " open alarm" + (c.open === 1 ? "" : "s"));
    if (open) open.hidden = !c.open;
    var sec = li.closest("[data-device]");
    if (c.open && sec && sec !== board.firstElementChild) {
      board.insertBefore(sec, board.firstElementChild); // open alarms first
    }
    return true;
  }

  var source = new EventSource(board.getAttribute("data-live"));
  source.addEventListener("board", function (e) {
    var msg = JSON.parse(e.data);
    var unknown = false;
    msg.devices.forEach(updateDevice);
    msg.cards.forEach(function (c) {
      if (!updateCard(c)) unknown = true;
    });
    say("");
    // a channel this page does not show yet (added meanwhile): the server's page has it
    if (unknown) window.location.reload();
  });
  source.addEventListener("error", function () {
    say(source.readyState === EventSource.CLOSED
      ? "Live updates stopped: reload the page."
      : "Live updates interrupted: reconnecting…");
  });
})();
