// Node peer of the smapws benchmark: the hub a JavaScript team would write with
// ws, redis (node-redis) and jsonwebtoken, honouring the same contract as smapws
// and bench/baselines/asyncio_hub.py:
//
// - env SMAPWS_HOST, SMAPWS_PORT, REDIS_URL, JWT_SECRET;
// - GET /ws upgrades when cookie access_token holds an HS256 JWT with sub and exp
//   (401 before the upgrade otherwise);
// - PSUBSCRIBE user_noti:*; each valid message (a JSON object with a string type)
//   goes to every open connection of that user as one text frame, plus a
//   timestamp if it has none;
// - GET /ready answers 200 once subscribed (503 before), GET /health a small JSON.
//
// Idiomatic and untuned: library defaults (no compression: ws's server default),
// the heartbeat from ws's README (ping every 30 s, terminate without a pong).
'use strict';

const http = require('node:http');
const { WebSocketServer, WebSocket } = require('ws');
const { createClient } = require('redis');
const jwt = require('jsonwebtoken');

const PREFIX = 'user_noti:';
const HEARTBEAT_MS = 30000;

const host = process.env.SMAPWS_HOST || '0.0.0.0';
const port = Number(process.env.SMAPWS_PORT || 8081);
const redisUrl = process.env.REDIS_URL || 'redis://127.0.0.1:6379/0';
const secret = process.env.JWT_SECRET;
if (!secret) {
  console.error('JWT_SECRET is required');
  process.exit(2);
}

/** user id -> Set of open WebSockets */
const connections = new Map();
let subscribed = false;

function cookie(header, name) {
  for (const part of (header || '').split(';')) {
    const eq = part.indexOf('=');
    if (eq > 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return null;
}

/** The sub of a valid access_token cookie, or null. */
function userOf(req) {
  const token = cookie(req.headers.cookie, 'access_token');
  if (!token) return null;
  try {
    const claims = jwt.verify(token, secret, { algorithms: ['HS256'] });
    if (typeof claims.exp !== 'number') return null;
    return typeof claims.sub === 'string' && claims.sub ? claims.sub : null;
  } catch {
    return null;
  }
}

const server = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (path === '/ready') {
    res.writeHead(subscribed ? 200 : 503).end(subscribed ? 'ready\n' : 'not ready\n');
  } else if (path === '/health') {
    let active = 0;
    for (const set of connections.values()) active += set.size;
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({
      status: 'ok',
      websocket: { active_connections: active, active_users: connections.size },
    }));
  } else {
    res.writeHead(404).end('not found\n');
  }
});

const wss = new WebSocketServer({ noServer: true });

server.on('upgrade', (req, socket, head) => {
  if (req.url.split('?')[0] !== '/ws') {
    socket.end('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  const user = userOf(req);
  if (!user) {
    socket.end('HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    ws.isAlive = true;
    ws.on('pong', () => { ws.isAlive = true; });
    let tabs = connections.get(user);
    if (!tabs) connections.set(user, (tabs = new Set()));
    tabs.add(ws);
    ws.on('close', () => {
      tabs.delete(ws);
      if (tabs.size === 0 && connections.get(user) === tabs) connections.delete(user);
    });
    ws.on('error', () => {});
  });
});

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) {
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, HEARTBEAT_MS);

function relay(message, channel) {
  const tabs = connections.get(channel.slice(PREFIX.length));
  if (!tabs) return;
  let data;
  try {
    data = JSON.parse(message);
  } catch {
    console.warn('dropped a message that is not JSON');
    return;
  }
  if (data === null || typeof data !== 'object' || typeof data.type !== 'string') {
    console.warn('dropped a message without a type');
    return;
  }
  if (!('timestamp' in data)) data.timestamp = new Date().toISOString();
  const text = JSON.stringify(data);
  for (const ws of tabs) {
    if (ws.readyState === WebSocket.OPEN) ws.send(text);
  }
}

async function main() {
  const subscriber = createClient({ url: redisUrl });
  subscriber.on('error', (err) => console.error('redis:', err.message));
  await subscriber.connect();
  await subscriber.pSubscribe(PREFIX + '*', relay);
  subscribed = true;
  server.listen(port, host, () => console.warn(`node hub listening on ${host}:${port}`));
  const stop = () => {
    clearInterval(heartbeat);
    for (const ws of wss.clients) ws.terminate();
    server.close();
    subscriber.quit().finally(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
