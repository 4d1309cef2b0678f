'use strict'
// A private aedes broker for the interop matrix (tests/fixtures/brokers.py starts it):
//   NODE_PATH=.cache/brokers/node_modules node tests/brokers/aedes_broker.js PORT [HOST]
// Plain MQTT 3.1.1 on HOST:PORT (127.0.0.1 by default), in-memory persistence (what aedes
// uses unless given a database): retained messages and sessions die with the process.
// SIGTERM closes the broker and exits 0; a port that cannot be bound exits 1.

const net = require('node:net')
const aedesFactory = require('aedes')
const { version } = require('aedes/package.json')

const port = Number(process.argv[2])
const host = process.argv[3] || '127.0.0.1'
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error(`usage: aedes_broker.js PORT [HOST] (got ${process.argv[2]})`)
  process.exit(2)
}

const aedes = aedesFactory()
const server = net.createServer(aedes.handle)

// One line per connection event: what the fixture's log tail shows when a test fails.
aedes.on('client', (client) => console.log(`client connected: ${client.id}`))
aedes.on('clientDisconnect', (client) => console.log(`client disconnected: ${client.id}`))
aedes.on('clientError', (client, err) => console.log(`client error ${client.id}: ${err.message}`))
aedes.on('connectionError', (client, err) => console.log(`connection error: ${err.message}`))

server.on('error', (err) => {
  console.error(`aedes ${version}: ${err.message}`)
  process.exit(1)
})
server.listen(port, host, () => {
  console.log(`aedes ${version} listening on ${host}:${port}`)
})

process.on('SIGTERM', () => {
  server.close()
  aedes.close(() => process.exit(0))
})
