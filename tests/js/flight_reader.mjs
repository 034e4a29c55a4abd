// A JavaScript Arrow Flight client with no Flight library: gRPC stubs from tests/proto/Flight.proto
// (@grpc/grpc-js + @grpc/proto-loader) and Arrow IPC decoding with apache-arrow.
//
//   node flight_reader.mjs HOST:PORT DATASET TABLE COLUMN
//
// Authenticates when FLIGHT_USERNAME / FLIGHT_PASSWORD are set (Handshake with HTTP Basic; the
// Bearer token from the answer's headers goes on every later call), lists flights, asks GetFlightInfo
// for the table (the listing carries no row counts), reads it with DoGet and prints JSON: the flights
// listed, the schema from FlightInfo, the row count and the values of COLUMN.
import { fileURLToPath } from "node:url";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { tableFromIPC } from "apache-arrow";

const here = path.dirname(fileURLToPath(import.meta.url));
const [target, dataset, tableName, column] = process.argv.slice(2);
if (!column) {
  console.error("usage: node flight_reader.mjs HOST:PORT DATASET TABLE COLUMN");
  process.exit(2);
}

const definition = protoLoader.loadSync(path.join(here, "..", "proto", "Flight.proto"), {
  keepCase: true, longs: String, enums: String, defaults: true,
});
const { FlightService } = grpc.loadPackageDefinition(definition).arrow.flight.protocol;
const client = new FlightService(target, grpc.credentials.createInsecure());
const headers = new grpc.Metadata();

function handshake(username, password) {
  return new Promise((resolve, reject) => {
    const md = new grpc.Metadata();
    md.set("authorization", "Basic " + Buffer.from(`${username}:${password}`).toString("base64").replace(/=+$/, ""));
    const call = client.Handshake(md);
    let token = null;
    call.on("metadata", (m) => { token = m.get("authorization")[0] ?? token; });
    call.on("data", () => {});
    call.on("error", reject);
    call.on("end", () => (token ? resolve(String(token)) : reject(new Error("no Bearer token in the Handshake answer"))));
    call.write({ protocol_version: 0, payload: Buffer.alloc(0) });
    call.end();
  });
}

function unary(method, request) {
  return new Promise((resolve, reject) => method.call(client, request, headers, (err, answer) => (err ? reject(err) : resolve(answer))));
}

function collect(call) {
  return new Promise((resolve, reject) => {
    const items = [];
    call.on("data", (item) => items.push(item));
    call.on("error", reject);
    call.on("end", () => resolve(items));
  });
}

// FlightData (data_header = a Message flatbuffer, data_body) -> encapsulated IPC messages -> a stream
const CONTINUATION = Buffer.from([0xff, 0xff, 0xff, 0xff]);
function ipcStream(messages) {
  const parts = [];
  for (const { header, body } of messages) {
    const padding = (8 - (header.length % 8)) % 8;
    const length = Buffer.alloc(4);
    length.writeInt32LE(header.length + padding);
    parts.push(CONTINUATION, length, header, Buffer.alloc(padding), body);
  }
  parts.push(CONTINUATION, Buffer.alloc(4));
  return new Uint8Array(Buffer.concat(parts));
}

function plain(value) {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Date) return value.toISOString();
  return value ?? null;
}

async function main() {
  if (process.env.FLIGHT_USERNAME) {
    headers.set("authorization", await handshake(process.env.FLIGHT_USERNAME, process.env.FLIGHT_PASSWORD ?? ""));
  }
  const infos = await collect(client.ListFlights({ expression: Buffer.alloc(0) }, headers));
  const listed = infos.find((i) => i.flight_descriptor.path.join("/") === `${dataset}/${tableName}`);
  if (!listed) throw new Error(`no flight ${dataset}/${tableName} among ${infos.length}`);
  const info = await unary(client.GetFlightInfo, listed.flight_descriptor);
  // FlightInfo.schema is one encapsulated IPC Schema message: add end-of-stream and it is a stream
  const schema = tableFromIPC(new Uint8Array(Buffer.concat([info.schema, CONTINUATION, Buffer.alloc(4)]))).schema;
  const data = await collect(client.DoGet(info.endpoint[0].ticket, headers));
  const table = tableFromIPC(ipcStream(data.map((d) => ({ header: d.data_header, body: d.data_body }))));
  const values = table.getChild(column).toArray();
  console.log(JSON.stringify({
    flights: infos.map((i) => i.flight_descriptor.path.join(".")),
    total_records: Number(info.total_records),
    schema: schema.fields.map((f) => f.name),
    messages: data.length,
    rows: table.numRows,
    columns: table.schema.fields.map((f) => f.name),
    values: Array.from(values, plain),
  }));
  client.close();
}

main().catch((err) => {
  console.error(`flight_reader: ${err.code !== undefined ? `gRPC ${err.code} ` : ""}${err.details ?? err.message}`);
  process.exit(1);
});
