// Records real WebTorrent tracker frames from npm `bittorrent-tracker` (its reference server,
// driven by its own client over real WebRTC on loopback) as fixtures for the protocol crate.
//
// A recording WebSocket proxy sits between the clients and the server, so every frame is
// captured exactly as it crossed the wire, in both directions, without patching either side.
//
// Usage: node record.mjs [--out FILE] [--tracker URL] [--separate-sockets]
//   --out FILE          where to write (default: ../protocol/tests/golden/bittorrent-tracker.jsonl)
//   --tracker URL       drive this tracker instead of starting the npm reference server
//                       (the interop and differential tests point it at tidepool-tracker)
//   --separate-sockets  give the second client its own WebSocket (by default the npm client
//                       shares one socket per tracker URL, so both peers ride one connection)
// Exits non-zero if any step times out or the two clients never open a data channel.
// Install first with: npm ci --ignore-scripts

import { writeFileSync, readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'
import { Server } from 'bittorrent-tracker'
import Client from 'bittorrent-tracker/client'
import WebSocketTracker from 'bittorrent-tracker/websocket-tracker'
import { installIceSettle } from './ice-settle.mjs'

const require = createRequire(import.meta.url)
const { WebSocketServer, WebSocket } = require('ws')

const here = dirname(fileURLToPath(import.meta.url))
const args = process.argv.slice(2)
const arg = name => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : undefined }
const outFile = arg('--out') || join(here, '..', 'protocol', 'tests', 'golden', 'bittorrent-tracker.jsonl')
const trackerUrl = arg('--tracker')
const separateSockets = args.includes('--separate-sockets')

// Offers and answers go out once their host candidates are gathered (see ice-settle.mjs).
installIceSettle(WebSocketTracker)
const version = JSON.parse(readFileSync(join(here, 'node_modules', 'bittorrent-tracker', 'package.json'))).version
const ndcVersion = JSON.parse(readFileSync(join(here, 'node_modules', 'node-datachannel', 'package.json'))).version

// Everything must finish by itself: a hard deadline ends a stuck run with an error.
const deadline = setTimeout(() => fail(new Error('recording did not finish within 60 s')), 60_000)

const frames = []
let connCount = 0
let stage = 'setup'

/// A tracker's reply to an announce (not an offer or answer it relays).
function isAnnounceReply (f) {
  if (f.dir !== 'tracker_to_client') return false
  try {
    const m = JSON.parse(f.frame)
    return m.action === 'announce' && m.offer === undefined && m.answer === undefined
  } catch {
    return false
  }
}

function fail (err) {
  console.error('record.mjs failed:', err)
  process.exit(1)
}

function sleep (ms) { return new Promise(resolve => setTimeout(resolve, ms)) }

// Resolves once `pred` holds for a recorded frame, or rejects after `ms`.
async function waitFor (what, pred, ms = 15_000) {
  const start = Date.now()
  while (Date.now() - start < ms) {
    if (frames.some(pred)) return
    await sleep(20)
  }
  throw new Error(`timed out waiting for ${what}`)
}

function latin1Hex (s) { return Buffer.from(s, 'latin1').toString('hex') }

async function main () {
  let server = null
  let upstreamUrl = trackerUrl
  if (!upstreamUrl) {
    server = new Server({ udp: false, http: false, ws: true, stats: false })
    server.on('warning', () => {}) // bad input below is deliberate
    server.on('error', fail)
    await new Promise(resolve => server.listen(0, '127.0.0.1', resolve))
    upstreamUrl = `ws://127.0.0.1:${server.ws.address().port}`
  }

  // The recording proxy: one upstream connection per downstream connection.
  const proxy = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false })
  await new Promise(resolve => proxy.on('listening', resolve))
  proxy.on('connection', downstream => {
    const conn = ++connCount
    const upstream = new WebSocket(upstreamUrl, { perMessageDeflate: false })
    const pending = []
    upstream.on('open', () => { for (const m of pending) upstream.send(m); pending.length = 0 })
    downstream.on('message', (data, isBinary) => {
      const text = data.toString('utf8')
      frames.push({ dir: 'client_to_tracker', conn, stage, binary: isBinary, frame: text })
      if (upstream.readyState === WebSocket.OPEN) upstream.send(text); else pending.push(text)
    })
    upstream.on('message', data => {
      const text = data.toString('utf8')
      frames.push({ dir: 'tracker_to_client', conn, stage, binary: false, frame: text })
      if (downstream.readyState === WebSocket.OPEN) downstream.send(text)
    })
    downstream.on('close', () => upstream.close())
    upstream.on('close', () => downstream.close())
    upstream.on('error', () => downstream.close())
    downstream.on('error', () => upstream.close())
  })
  const url = `ws://127.0.0.1:${proxy.address().port}`

  const infoHash = 'c0ffee00' + Buffer.from('tidepool golden').toString('hex').padEnd(32, '0').slice(0, 32)
  // Peer ids with bytes that exercise JSON escaping: control bytes, quote, backslash, >0x7F.
  const peerA = Buffer.from('2d5757303230302d' + '00011f22' + '5c7f80ff' + 'e9416263', 'hex')
  const peerB = Buffer.from('2d5757303230302d' + '0a0d0908' + '0c2f3a7e' + 'a0b0c0d0', 'hex')
  const rtcConfig = { iceServers: [], bindAddress: '127.0.0.1' }
  const common = { infoHash, port: 6881, rtcConfig, getAnnounceOpts: () => ({ numwant: 2 }) }

  const a = new Client({ ...common, announce: [url], peerId: peerA })
  // A different URL string is a different socket in the npm client's per-URL pool.
  const b = new Client({ ...common, announce: [separateSockets ? `${url}/b` : url], peerId: peerB })
  for (const c of [a, b]) { c.on('error', fail); c.on('warning', () => {}) }

  // Real data channels between the two clients prove the offers and answers were usable.
  let connected = 0
  const onPeer = peer => peer.once('connect', () => { connected++ })
  a.on('peer', onPeer)
  b.on('peer', onPeer)

  stage = 'start_a'
  a.start()
  await waitFor('announce response to A', f => f.stage === 'start_a' && f.dir === 'tracker_to_client')

  stage = 'start_b'
  b.start()
  await waitFor('forwarded answer to B', f => f.dir === 'tracker_to_client' && f.frame.includes('"answer"'))
  const start = Date.now()
  while (connected < 2 && Date.now() - start < 15_000) await sleep(20)
  if (connected < 2) throw new Error('the two clients never opened a data channel')

  stage = 'scrape'
  a.scrape()
  await waitFor('scrape response', f => f.stage === 'scrape' && f.dir === 'tracker_to_client')

  // An update or completion also relays B's new offers to A: wait for B's announce reply
  // itself, or a slow reply is counted in the next stage.
  stage = 'update'
  b.update()
  await waitFor('update response', f => f.stage === 'update' && isAnnounceReply(f))

  stage = 'complete'
  b.complete()
  await waitFor('completed response', f => f.stage === 'complete' && isAnnounceReply(f))

  stage = 'stop'
  b.stop()
  await waitFor('stopped response', f => f.stage === 'stop' && f.dir === 'tracker_to_client')

  // Frames the client library does not send but real deployments see: a multi-hash scrape,
  // a scrape of everything, and bad input, sent raw through the same proxy.
  const raw = new WebSocket(url, { perMessageDeflate: false })
  await new Promise((resolve, reject) => { raw.on('open', resolve); raw.on('error', reject) })
  const bin = hex => Buffer.from(hex, 'hex').toString('latin1')
  const rawFrames = [
    ['scrape_many', { action: 'scrape', info_hash: [bin(infoHash), bin('ab'.repeat(20))] }],
    ['scrape_all', { action: 'scrape' }],
    ['error_bad_info_hash', { action: 'announce', info_hash: 'too short', peer_id: bin('11'.repeat(20)) }],
    ['error_unknown_action', { action: 'connect', info_hash: bin(infoHash) }]
  ]
  for (const [name, msg] of rawFrames) {
    stage = name
    raw.send(JSON.stringify(msg))
    await waitFor(`${name} reply`, f => f.stage === name && f.dir === 'tracker_to_client', 5_000)
  }
  raw.close()

  stage = 'teardown'
  await new Promise(resolve => a.destroy(resolve))
  await new Promise(resolve => b.destroy(resolve))
  proxy.close()
  if (server) server.close()

  const meta = {
    meta: {
      source: trackerUrl
        ? `npm bittorrent-tracker ${version} client against ${trackerUrl}, node-datachannel ${ndcVersion}, node ${process.version}`
        : `npm bittorrent-tracker ${version} (server and client), node-datachannel ${ndcVersion}, node ${process.version}`,
      recorded_by: 'interop/record.mjs',
      separate_sockets: separateSockets,
      info_hash_hex: infoHash,
      peer_ids_hex: [latin1Hex(peerA.toString('latin1')), latin1Hex(peerB.toString('latin1'))],
      data_channels_opened: connected
    }
  }
  const lines = [JSON.stringify(meta), ...frames.map(f => JSON.stringify(f))]
  writeFileSync(outFile, lines.join('\n') + '\n')
  console.log(`recorded ${frames.length} frames from bittorrent-tracker ${version} into ${outFile}`)
  clearTimeout(deadline)
  // webrtc-polyfill keeps native handles alive for a while; the work is done.
  process.exit(0)
}

main().catch(fail)
