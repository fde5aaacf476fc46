/* A stand-in for TikTok's pixel SDK (analytics.tiktok.com/i18n/pixel/events.js), for
 * the demo shop only: the real one cannot be downloaded here. It does what matters
 * to pixel.js the way the real SDK does: it replaces the base code's queue object
 * with its own, replays the queued calls, sets the first-party _ttp cookie, and
 * takes ttq.track(event, properties, {event_id}) and ttq.page(). Instead of
 * sending to TikTok it records each call in window.TiktokPixelStandIn.calls and
 * announces it as a "ttq:standin" DOM event.
 */
(function (window, document) {
  "use strict";
  var name = window.TiktokAnalyticsObject || "ttq";
  var queue = window[name] || [];
  var calls = [];
  var pixels = queue._i && typeof queue._i === "object" ? Object.keys(queue._i) : [];
  var consent = "granted";
  var held = [];

  function ttp() {
    var match = /(?:^|;\s*)_ttp=([^;]*)/.exec(document.cookie || "");
    if (match) return match[1];
    var chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    var value = "";
    var random = window.crypto.getRandomValues(new Uint8Array(27));
    for (var i = 0; i < random.length; i++) value += chars[random[i] % chars.length];
    // As the real pixel: first party, 13 months.
    document.cookie = "_ttp=" + value + "; path=/; max-age=34190000; SameSite=Lax";
    return value;
  }

  function record(pixel, type, event, properties, options) {
    var call = {
      pixel_code: pixel,
      type: type,
      event: event,
      event_id: options && options.event_id !== undefined ? String(options.event_id) : null,
      properties: properties || {},
      ttp: ttp(),
      at: Date.now()
    };
    if (consent === "denied") return;
    if (consent === "pending") {
      held.push(call);
      return;
    }
    calls.push(call);
    try {
      document.dispatchEvent(new CustomEvent("ttq:standin", { detail: call }));
    } catch (e) {
      /* an old browser: the call is still recorded */
    }
  }

  function forPixels(only, f) {
    (only ? [only] : pixels).forEach(f);
  }

  function methods(only) {
    return {
      track: function (event, properties, options) {
        forPixels(only, function (pixel) {
          record(pixel, "track", event, properties, options);
        });
      },
      page: function (properties, options) {
        forPixels(only, function (pixel) {
          record(pixel, "page", "Pageview", properties, options);
        });
      },
      identify: function () {},
      on: function () {},
      off: function () {},
      once: function () {},
      ready: function (f) {
        if (typeof f === "function") f();
      },
      alias: function () {},
      group: function () {},
      debug: function () {},
      enableCookie: function () {},
      disableCookie: function () {}
    };
  }

  var sdk = methods(null);
  sdk._i = queue._i || {};
  sdk._o = queue._o || {};
  sdk._t = queue._t || {};
  sdk.methods = queue.methods;
  sdk.standIn = true;
  sdk.load = function (code, options) {
    if (pixels.indexOf(code) < 0) pixels.push(code);
    sdk._i[code] = sdk._i[code] || [];
    sdk._o[code] = options || {};
  };
  sdk.instance = function (code) {
    return methods(String(code));
  };
  sdk.instances = function () {
    return pixels.map(function (code) {
      return methods(code);
    });
  };
  sdk.holdConsent = function () {
    consent = "pending";
  };
  sdk.revokeConsent = function () {
    consent = "denied";
    held = [];
  };
  sdk.grantConsent = function () {
    consent = "granted";
    var waiting = held;
    held = [];
    waiting.forEach(function (call) {
      calls.push(call);
    });
  };

  window.TiktokPixelStandIn = { calls: calls, pixels: pixels, ttp: ttp };
  ttp();

  // The real SDK swaps its object in for the queue, then runs what was queued, with
  // its own functions (not through window.ttq), per pixel instance too.
  var own = { track: sdk.track, page: sdk.page };
  window[name] = sdk;
  function replay(entries, target) {
    if (!Array.isArray(entries)) return;
    entries.forEach(function (entry) {
      if (!Array.isArray(entry)) return;
      var f = target[entry[0]];
      if (typeof f === "function") f.apply(target, entry.slice(1));
    });
  }
  var main = { track: own.track, page: own.page };
  Object.keys(sdk).forEach(function (key) {
    if (!(key in main) && typeof sdk[key] === "function") main[key] = sdk[key];
  });
  replay(queue, main);
  Object.keys(sdk._i).forEach(function (code) {
    replay(sdk._i[code], methods(code));
  });
})(window, document);
