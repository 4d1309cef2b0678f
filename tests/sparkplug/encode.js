'use strict'
// The Sparkplug tests' independent encoder (a host's NCMD/DCMD): Eclipse Tahu's encodePayload.
//   NODE_PATH=.cache/sparkplug/node_modules node tests/sparkplug/encode.js < payloads.json
// stdin: a JSON array of Tahu payload objects ({timestamp, metrics: [{name, type, value}]});
// stdout: a JSON array of the encoded payloads, base64.

const { get } = require('sparkplug-payload')

const sparkplug = get('spBv1.0')
let input = ''
process.stdin.setEncoding('utf8')
process.stdin.on('data', (chunk) => { input += chunk })
process.stdin.on('end', () => {
  const out = JSON.parse(input).map((payload) =>
    Buffer.from(sparkplug.encodePayload(payload)).toString('base64'))
  process.stdout.write(JSON.stringify(out))
})
