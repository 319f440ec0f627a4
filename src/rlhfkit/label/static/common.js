// rlhfkit label: what every judging page shares (posting JSON, status messages, locking, skipping,
// the good/bad rating and the keys that mean the same on every page). No dependencies. Model text
// is only ever set with textContent: it stays untrusted text.
(function () {
  "use strict";

  function page(form) {
    var message = document.getElementById("message");
    var self = { busy: false, itemId: parseInt(form.dataset.itemId, 10) };

    self.say = function (text, kind) {
      message.textContent = text;
      message.className = kind || "";
    };

    self.send = function (url, body) {
      return fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "Accept": "application/json" },
        body: JSON.stringify(body)
      }).then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (data) {
          return { status: r.status, data: data };
        });
      });
    };

    self.lock = function (on) {
      self.busy = on;
      Array.prototype.forEach.call(form.querySelectorAll("button"), function (b) { b.disabled = on; });
    };

    self.next = function () { window.location.assign(form.dataset.next || "/"); };

    self.rating = function () {
      var input = form.querySelector('input[name="rating"]:checked');
      return input ? input.value : null;
    };

    self.toggleRating = function (value) {
      var input = form.querySelector('input[name="rating"][value="' + value + '"]');
      if (input) input.checked = !input.checked;
    };

    self.flagsOf = function (label) {
      return Array.prototype.map.call(
        form.querySelectorAll('input[name="flag-' + label + '"]:checked'),
        function (el) { return el.value; });
    };

    // Each response's own good/bad, for the ones rated: {"A": "good", "B": "bad"}.
    self.qualityOf = function (labels) {
      var out = {};
      labels.forEach(function (label) {
        var input = form.querySelector('input[name="quality-' + label + '"]:checked');
        if (input) out[label] = input.value;
      });
      return out;
    };

    // POST a judgment; 201/200 saved (then onSaved(stored), by default the next item), 409 already judged.
    self.post = function (url, body, what, onSaved) {
      if (self.busy) return;
      self.lock(true);
      self.say("Saving…");
      return self.send(url, body).then(function (res) {
        if (res.status === 201 || res.status === 200) {
          self.say("Saved.", "good");
          (onSaved || self.next)(res.data);
        } else if (res.status === 409 && res.data && res.data.judgment) {
          self.say("You had already judged this " + what + "; your first judgment stands.", "bad");
          setTimeout(self.next, 1200);
        } else {
          self.say("Not saved: " + ((res.data && res.data.detail) || ("HTTP " + res.status)), "bad");
          self.lock(false);
        }
      }, function () {
        self.say("Not saved: the server could not be reached. Press Enter to try again.", "bad");
        self.lock(false);
      });
    };

    self.skip = function () {
      if (self.busy) return;
      self.lock(true);
      self.send("/api/skip", { item_id: self.itemId }).then(function (res) {
        if (res.status === 200) { self.next(); }
        else { self.say("Could not skip: " + ((res.data && res.data.detail) || res.status), "bad"); self.lock(false); }
      }, function () { self.say("Could not skip: the server could not be reached.", "bad"); self.lock(false); });
    };

    // Keys: Enter submits (Ctrl+Enter from a text box); G/B rate; S skips; other keys go to onKey.
    self.keys = function (submit, onKey) {
      document.addEventListener("keydown", function (e) {
        var t = e.target;
        var typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && /^(text|number|search)$/.test(t.type)));
        if (e.key === "Enter") {
          if (typing && !(e.ctrlKey || e.metaKey)) return;
          if (!typing && t && t.tagName === "BUTTON" && t.type === "button") return;  // Enter presses it
          e.preventDefault();
          submit();
          return;
        }
        if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
        if (e.key === "g" || e.key === "G") { e.preventDefault(); self.toggleRating("good"); }
        else if (e.key === "b" || e.key === "B") { e.preventDefault(); self.toggleRating("bad"); }
        else if ((e.key === "s" || e.key === "S") && document.getElementById("skip")) { e.preventDefault(); self.skip(); }
        else if (onKey && onKey(e)) { e.preventDefault(); }
      });
    };
    return self;
  }

  window.RlhfkitLabel = { page: page };
})();
