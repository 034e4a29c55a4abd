// A Flight SQL session through npm's @lakehouse-rs/flight-sql-client (arrow-rs's Flight SQL client behind
// napi-rs), used as its README shows: createFlightSqlClient(options), then query / getCatalogs /
// getDbSchemas / getTables, each answering Arrow IPC bytes that apache-arrow's tableFromIPC reads.
//
//   node flight_sql_client.mjs PORT ACTION '{"login": {...}, ...}'
//
// login: {} (anonymous), {"username", "password"} or {"token"}. Actions: browse (schema, table),
// query (sql), api (the client's methods), long_lived (sql, seconds, every: a query every `every` s until one succeeded after `seconds`). Prints one JSON answer; an error is
// {"error": ..., "message": ...} with the text the client's user sees.
import { createFlightSqlClient } from "@lakehouse-rs/flight-sql-client";
import { tableFromIPC } from "apache-arrow";

const [port, action, raw] = process.argv.slice(2);
const args = JSON.parse(raw ?? "{}");

function plain(value) {
  if (typeof value === "bigint") return Number(value);
  if (value instanceof Date) return value.toISOString();
  return value ?? null;
}

function rows(buffer) {
  const table = tableFromIPC(buffer);
  const columns = table.schema.fields.map((f) => f.name);
  return { columns, rows: table.toArray().map((row) => columns.map((c) => plain(row[c]))) };
}

function column(buffer, name) {
  return Array.from(tableFromIPC(buffer).getChild(name).toArray(), plain);
}

async function main() {
  const login = args.login ?? {};
  const client = await createFlightSqlClient({
    host: "127.0.0.1", port: Number(port), tls: false, headers: [],
    ...(login.username !== undefined ? { username: login.username, password: login.password } : {}),
    ...(login.token !== undefined ? { token: login.token } : {}),
  });
  if (action === "browse") {
    const tables = tableFromIPC(await client.getTables({ dbSchemaFilterPattern: args.schema, includeSchema: true }));
    const names = Array.from(tables.getChild("table_name").toArray());
    const bytes = tables.getChild("table_schema").get(names.indexOf(args.table));
    // table_schema is one encapsulated IPC Schema message: add end-of-stream and it is a stream
    const schema = tableFromIPC(new Uint8Array([...bytes, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0])).schema;
    return {
      catalogs: column(await client.getCatalogs(), "catalog_name"),
      schemas: column(await client.getDbSchemas({}), "db_schema_name"),
      tables: names,
      columns: schema.fields.map((f) => f.name),
    };
  }
  if (action === "query") return rows(await client.query(args.sql));
  // what the client offers: its methods (no parameters, prepared statements or session options among them)
  if (action === "api") return { methods: Object.getOwnPropertyNames(Object.getPrototypeOf(client)).sort() };
  if (action === "long_lived") { // one connection, a query every `every` seconds until one ran after `seconds`
    const counts = [];
    const started = Date.now();
    let elapsed = 0;
    while (elapsed < args.seconds) {
      try {
        counts.push(rows(await client.query(args.sql)).rows[0][0]);
      } catch (err) {
        return { counts, failed_after: (Date.now() - started) / 1000, error: err.code ?? "Error", message: err.message };
      }
      elapsed = (Date.now() - started) / 1000;
      await new Promise((resolve) => setTimeout(resolve, args.every * 1000));
    }
    return { counts, last_ok_after: elapsed };
  }
  throw new Error(`unknown action ${action}`);
}

main().then(
  (answer) => { console.log(JSON.stringify(answer)); process.exit(0); },
  (err) => { console.log(JSON.stringify({ error: err.code ?? "Error", message: err.message })); process.exit(0); },
);
