'use strict'
// The Sparkplug tests' independent decoder: Eclipse Tahu's JavaScript payload library.
//   NODE_PATH=.cache/sparkplug/node_modules node tests/sparkplug/decode.js < messages.json
// stdin: a JSON array of base64 payloads; stdout: a JSON array with, for each, Tahu's
// decodePayload() result and the raw protobuf fields of each metric (Tahu's generated
// protobufjs decoder), 64-bit integers as decimal strings (JSON numbers lose them).
// The raw fields are there because sparkplug-payload 1.0.3 reads UInt32 from long_value where
// Sparkplug 3.0 puts it in int_value (docs/sparkplug.md, "Datatypes").

const { get } = require('sparkplug-payload')
const proto = require('sparkplug-payload/lib/sparkplugPayloadProto')
const Long = require('long')

const sparkplug = get('spBv1.0')
const Payload = proto.org.eclipse.tahu.protobuf.Payload

function plain (value) {
  if (value === null || value === undefined) return value === undefined ? null : value
  if (Long.isLong(value)) return value.toString()
  if (typeof value === 'bigint') return value.toString()
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return Buffer.from(value).toString('base64')
  if (Array.isArray(value)) return value.map(plain)
  if (typeof value === 'object') {
    const out = {}
    for (const key of Object.keys(value)) out[key] = plain(value[key])
    return out
  }
  return value
}

let input = ''
process.stdin.setEncoding('utf8')
process.stdin.on('data', (chunk) => { input += chunk })
process.stdin.on('end', () => {
  const out = JSON.parse(input).map((b64) => {
    const bytes = Buffer.from(b64, 'base64')
    const decoded = sparkplug.decodePayload(bytes)
    const raw = Payload.toObject(Payload.decode(bytes), { longs: String, defaults: false })
    return { tahu: plain(decoded), raw: plain(raw) }
  })
  process.stdout.write(JSON.stringify(out))
})
