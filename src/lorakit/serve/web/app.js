// The page: views chosen by the URL's #hash, the API key, and the list of models every view shares.

import { ApiError, api, apiKey, setApiKey } from "./api.js";
import { Adapters } from "./adapters.js";
import { Compare } from "./compare.js";
import { Runs } from "./runs.js";
import { Server } from "./server.js";

const VIEWS = ["compare", "adapters", "runs", "server"];

// The base model and adapters (GET /v1/models), refreshed after a load or an unload.
const models = {
  base: null,
  adapters: [],
  listeners: [],
  async refresh() {
    const data = await api("/v1/models");
    this.base = data.data.find((m) => !m.parent)?.id ?? null;
    this.adapters = data.data.filter((m) => m.parent).map((m) => m.id);
    document.getElementById("base-name").textContent = this.base ? `base: ${this.base}` : "";
    for (const listener of this.listeners) listener();
  },
};

const views = {
  compare: new Compare(models),
  adapters: new Adapters(models),
  runs: new Runs(),
  server: new Server(),
};

function show() {
  const name = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "compare";
  for (const view of VIEWS) {
    document.getElementById(view).hidden = view !== name;
    document.querySelector(`nav a[data-view=${view}]`).classList.toggle("active", view === name);
    if (view !== name) views[view].hide?.();
  }
  views[name].show?.();
}

// Ask for the key; resolves once the dialog closes (with a key that works, or without one).
function askForKey(message = "") {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-error").textContent = message;
  input.value = apiKey();
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      async () => {
        if (dialog.returnValue === "ok") setApiKey(input.value.trim());
        resolve();
      },
      { once: true },
    );
  });
}

async function start() {
  window.addEventListener("hashchange", show);
  document.getElementById("key-button").addEventListener("click", async () => {
    await askForKey();
    await connect();
  });
  await connect();
  show();
}

// Load the model list; on a 401, ask for the key until one works or the person declines.
async function connect() {
  let message = apiKey() ? "That key was refused; try again." : "";
  for (;;) {
    try {
      await models.refresh();
      document.body.dataset.ready = "true";
      return;
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401) throw err;
      document.body.dataset.ready = "locked";
      await askForKey(message);
      if (document.getElementById("key-dialog").returnValue !== "ok") return;
      message = "That key was refused; try again.";
    }
  }
}

start().catch((err) => {
  document.getElementById("base-name").textContent = `cannot reach the server: ${err.message || err}`;
  document.getElementById("base-name").classList.add("error");
});
