/*! tiktok-events-gateway pixel.js %VERSION%
 * Mirrors the page's ttq.track(event, properties, options) and ttq.page() calls
 * to the gateway's /pixel/events with the same event_id TikTok's pixel gets:
 * options.event_id when the page gave one, else a new one that is handed to ttq
 * too. Include it after the pixel's base code (before works too):
 *
 *   <script async src="https://events.shop.example.com/pixel.js"></script>
 *
 * and send window.tkgw.lastEventId with your server-side call. Optional
 * attributes on the script tag:
 *   data-endpoint        where to post (default: /pixel/events beside this script)
 *   data-pixel           pixel code(s), comma separated (default: those ttq.load()ed)
 *   data-consent         granted (default) | pending (hold until granted) | denied
 *   data-consent-check   a global function or value, e.g. "Cookiebot.consent.marketing",
 *                        asked before each send: when it says no, nothing is sent
 *   data-limited-data-use  "1": every event carries limited_data_use
 * The pixel's own ttq.holdConsent/grantConsent/revokeConsent are honoured, and
 * limited_data_use from ttq.load(code, {limited_data_use: true}) or a call's
 * options is carried along. Nothing here can break the page: every step is
 * guarded, and an unreachable gateway costs one failed beacon.
 */
(function (window, document) {
  "use strict";
  if (window.tkgw && window.tkgw.version) return; // included twice: the first one works

  var VERSION = "%VERSION%";
  var HOOKED = "__tkgwHooked";
  var CONSENT = { granted: "granted", pending: "pending", denied: "denied" };
  var MAX_HELD = 50;
  var MAX_SEEN = 500;

  var script = document.currentScript || findScript();
  var ttqName = window.TiktokAnalyticsObject || "ttq";
  var endpoint = attr("endpoint") || beside(script, "/pixel/events");
  var fixedPixels = split(attr("pixel"));
  var consentState = CONSENT[String(attr("consent") || "granted").toLowerCase()] || "denied";
  var consentCheck = attr("consent-check");
  var lduAll = truthy(attr("limited-data-use"));
  var loadOptions = {}; // pixel code -> options given to ttq.load
  var held = []; // bodies waiting for consent
  var seen = {}; // "name\nevent_id" already mirrored (the pixel replays its queue)
  var seenCount = 0;

  var api = {
    version: VERSION,
    endpoint: endpoint,
    lastEventId: null,
    lastEvent: null,
    eventIds: {}, // event name -> its last event_id
    newEventId: newEventId,
    consent: function (state) {
      if (arguments.length) setConsent(state);
      return consentState;
    },
    limitedDataUse: function (on) {
      lduAll = !!on;
    }
  };
  window.tkgw = api;

  // -- finding and hooking ttq ------------------------------------------------

  function findScript() {
    var all = document.getElementsByTagName("script");
    for (var i = all.length - 1; i >= 0; i--) {
      if (/\/pixel\.js(\?|#|$)/.test(all[i].src || "")) return all[i];
    }
    return null;
  }

  function attr(name) {
    return script && script.getAttribute ? script.getAttribute("data-" + name) : null;
  }

  function beside(el, path) {
    try {
      return new URL(path, el && el.src ? el.src : window.location.href).href;
    } catch (e) {
      return path;
    }
  }

  function split(value) {
    var out = [];
    String(value || "").split(",").forEach(function (part) {
      part = part.trim();
      if (part) out.push(part);
    });
    return out;
  }

  function truthy(value) {
    return value === true || /^(1|true|yes|on)$/i.test(String(value || ""));
  }

  function guarded(f, fallback) {
    try {
      return f();
    } catch (e) {
      return fallback;
    }
  }

  // Replace obj[name] by an accessor: reads give our wrapper around whatever was
  // assigned last, so the pixel swapping in its real methods keeps the hook.
  function wrap(obj, name, around) {
    var impl = obj[name];
    var wrapper = function () {
      var args = Array.prototype.slice.call(arguments);
      if (typeof impl !== "function") return undefined;
      return around(impl, this, args);
    };
    guarded(function () {
      Object.defineProperty(obj, name, {
        configurable: true,
        enumerable: true,
        get: function () {
          return typeof impl === "function" ? wrapper : impl;
        },
        set: function (value) {
          impl = value;
        }
      });
    });
  }

  function hook(q, pixel) {
    if (!q || (typeof q !== "object" && typeof q !== "function") || q[HOOKED]) return q;
    var ok = guarded(function () {
      Object.defineProperty(q, HOOKED, { value: true });
      return true;
    }, false);
    if (!ok) return q;
    adoptQueue(q, pixel);
    wrap(q, "track", function (impl, self, args) {
      return impl.apply(self, guarded(function () { return onTrack(pixel, args); }, args));
    });
    wrap(q, "page", function (impl, self, args) {
      return impl.apply(self, guarded(function () { return onPage(pixel, args); }, args));
    });
    wrap(q, "load", function (impl, self, args) {
      guarded(function () { onLoad(args); });
      return impl.apply(self, args);
    });
    wrap(q, "instance", function (impl, self, args) {
      return hook(impl.apply(self, args), String(args[0]));
    });
    wrap(q, "holdConsent", function (impl, self, args) {
      setConsent("pending");
      return impl.apply(self, args);
    });
    wrap(q, "grantConsent", function (impl, self, args) {
      setConsent("granted");
      return impl.apply(self, args);
    });
    wrap(q, "revokeConsent", function (impl, self, args) {
      setConsent("denied");
      return impl.apply(self, args);
    });
    var instances = q._i;
    if (!pixel && instances && typeof instances === "object") {
      Object.keys(instances).forEach(function (code) {
        hook(instances[code], code);
      });
    }
    return q;
  }

  // Calls made before we were here wait in the base code's queue (an array of
  // [method, ...args]): mirror them and give them their event_id before the pixel
  // reads them. A pixel already running has consumed its queue: nothing to do.
  function adoptQueue(q, pixel) {
    if (!Array.isArray(q)) return;
    for (var i = 0; i < q.length; i++) {
      var entry = q[i];
      if (!Array.isArray(entry)) continue;
      var method = entry[0];
      var args = entry.slice(1);
      if (method === "track") q[i] = ["track"].concat(onTrack(pixel, args));
      else if (method === "page") q[i] = ["page"].concat(onPage(pixel, args));
      else if (method === "load") onLoad(args);
      else if (method === "holdConsent") setConsent("pending");
      else if (method === "grantConsent") setConsent("granted");
      else if (method === "revokeConsent") setConsent("denied");
    }
  }

  function ensureHooked() {
    guarded(function () {
      hook(window[ttqName], null);
    });
  }

  // Catch the pixel (re)assigning window.ttq: its base code when we came first,
  // its real object when it loads. Where that is impossible, look again later.
  guarded(function () {
    var current = window[ttqName];
    Object.defineProperty(window, ttqName, {
      configurable: true,
      enumerable: true,
      get: function () {
        return current;
      },
      set: function (value) {
        current = value;
        guarded(function () { hook(value, null); });
      }
    });
  });
  ensureHooked();
  [0, 250, 1000, 3000, 10000].forEach(function (ms) {
    setTimeout(ensureHooked, ms);
  });
  guarded(function () {
    document.addEventListener("DOMContentLoaded", ensureHooked);
    window.addEventListener("load", ensureHooked);
  });

  // -- the calls --------------------------------------------------------------

  function onTrack(pixel, args) {
    var name = args[0];
    if (typeof name !== "string" || !name) return args;
    var withId = eventIdOf(args[2]);
    var out = args.slice();
    out[1] = args[1] === undefined || args[1] === null ? {} : args[1];
    out[2] = withId.options;
    mirror(pixel, name, withId.id, out[1], withId.options);
    return out;
  }

  function onPage(pixel, args) {
    var withId = eventIdOf(args[1]);
    var out = args.slice();
    out[0] = args[0] === undefined || args[0] === null ? {} : args[0];
    out[1] = withId.options;
    mirror(pixel, "Pageview", withId.id, out[0], withId.options);
    return out;
  }

  function onLoad(args) {
    if (typeof args[0] === "string" && args[0]) loadOptions[args[0]] = args[1] || {};
  }

  // The page's event_id, or a new one added to a copy of its options.
  function eventIdOf(options) {
    var opts = options && typeof options === "object" ? options : {};
    var given = opts.event_id;
    if (given !== undefined && given !== null && String(given) !== "") {
      return { id: String(given), options: opts };
    }
    var copy = {};
    Object.keys(opts).forEach(function (key) {
      copy[key] = opts[key];
    });
    copy.event_id = newEventId();
    return { id: copy.event_id, options: copy };
  }

  function newEventId() {
    var c = window.crypto;
    var id = null;
    if (c && typeof c.randomUUID === "function") {
      id = guarded(function () { return c.randomUUID(); }, null); // secure contexts only
    }
    return id || fallbackId();
  }

  function fallbackId() {
    var random = "";
    var c = window.crypto;
    if (c && c.getRandomValues) {
      var words = c.getRandomValues(new Uint32Array(3));
      for (var i = 0; i < words.length; i++) random += words[i].toString(36);
    } else {
      random = Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2);
    }
    return Date.now().toString(36) + "-" + random;
  }

  function mirror(pixel, name, eventId, properties, options) {
    api.lastEventId = eventId;
    api.lastEvent = { event: name, event_id: eventId };
    api.eventIds[name] = eventId;
    var key = name + "\n" + eventId;
    if (seen[key]) return;
    if (seenCount >= MAX_SEEN) {
      seen = {};
      seenCount = 0;
    }
    seen[key] = true;
    seenCount++;
    var codes = pixel ? [pixel] : pixelCodes(options);
    var events = codes.map(function (code) {
      return buildEvent(code, name, eventId, properties, options);
    });
    var outcome = events.length ? dispatch(events) : "no_pixel";
    announce("tkgw:event", { event: name, event_id: eventId, pixels: codes, outcome: outcome });
  }

  function pixelCodes(options) {
    if (options && options.pixel_code) return [String(options.pixel_code)];
    if (fixedPixels.length) return fixedPixels.slice();
    var codes = [];
    var q = window[ttqName];
    var loaded = q && q._i && typeof q._i === "object" ? Object.keys(q._i) : [];
    loaded.concat(Object.keys(loadOptions)).forEach(function (code) {
      if (codes.indexOf(code) < 0) codes.push(code);
    });
    return codes;
  }

  function buildEvent(code, name, eventId, properties, options) {
    var event = { pixel_code: code, event: name, event_id: eventId, page: { url: window.location.href } };
    if (document.referrer) event.page.referrer = document.referrer;
    if (properties && typeof properties === "object" && Object.keys(properties).length) {
      event.properties = properties;
    }
    var user = {};
    var ttp = cookie("_ttp");
    var ttclid = cookie("ttclid");
    if (ttp) user.ttp = ttp;
    if (ttclid) user.ttclid = ttclid;
    if (ttp || ttclid) event.user = user;
    if (limitedDataUse(code, options)) event.limited_data_use = true;
    return event;
  }

  function limitedDataUse(code, options) {
    if (lduAll || (options && truthy(options.limited_data_use))) return true;
    var q = window[ttqName];
    var loaded = (q && q._o && q._o[code]) || loadOptions[code];
    return !!(loaded && truthy(loaded.limited_data_use));
  }

  function cookie(name) {
    var parts = String(document.cookie || "").split(/;\s*/);
    for (var i = 0; i < parts.length; i++) {
      var eq = parts[i].indexOf("=");
      if (eq > 0 && parts[i].slice(0, eq) === name) {
        var raw = parts[i].slice(eq + 1);
        return guarded(function () { return decodeURIComponent(raw); }, raw);
      }
    }
    return null;
  }

  // -- consent and sending ------------------------------------------------------

  function setConsent(state) {
    if (state === true) state = "granted";
    if (state === false) state = "denied";
    consentState = CONSENT[String(state).toLowerCase()] || "denied";
    if (consentState === "denied") held = [];
    if (consentState === "granted") {
      var waiting = held;
      held = [];
      waiting.forEach(function (events) {
        if (checkSaysYes()) send(events);
      });
    }
  }

  function checkSaysYes() {
    if (!consentCheck) return true;
    return guarded(function () {
      var value = window;
      var path = consentCheck.split(".");
      for (var i = 0; i < path.length && value !== undefined && value !== null; i++) {
        value = value[path[i]];
      }
      if (typeof value === "function") value = value();
      return !!value;
    }, false);
  }

  function dispatch(events) {
    if (consentState === "denied") return "denied";
    if (consentState === "pending") {
      if (held.length < MAX_HELD) held.push(events);
      return "held";
    }
    if (!checkSaysYes()) return "denied";
    return send(events) ? "sent" : "failed";
  }

  function send(events) {
    var body = guarded(function () {
      return JSON.stringify(events.length === 1 ? events[0] : events);
    }, null);
    if (body === null) return false;
    // A text/plain string: a "simple" request, no CORS preflight, cookies included.
    var queued = guarded(function () {
      return !!(window.navigator.sendBeacon && window.navigator.sendBeacon(endpoint, body));
    }, false);
    if (queued) return true;
    return guarded(function () {
      if (typeof window.fetch !== "function") return false;
      window
        .fetch(endpoint, {
          method: "POST",
          body: body,
          keepalive: true,
          credentials: "include",
          mode: "cors",
          headers: { "Content-Type": "text/plain;charset=UTF-8" }
        })
        .catch(function () {});
      return true;
    }, false);
  }

  function announce(type, detail) {
    guarded(function () {
      document.dispatchEvent(new CustomEvent(type, { detail: detail }));
    });
  }

  announce("tkgw:ready", { version: VERSION });
})(window, document);
