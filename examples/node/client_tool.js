// A Node.js client of agentrun that executes one of the agent's tools itself.
//
// It makes sure an agent with a client tool, "weather", exists (CreateAgent), starts a run of it
// (StreamRun), and when the run asks for the tool's result (ClientToolCallRequired), executes
// the tool here and submits the result (SubmitToolResult). Then it prints the final answer.
//
//   node client_tool.js [--target 127.0.0.1:50051] [--agent node-weather] [--mode classic|durable]
//
// AGENTRUN_API_KEY, when set, is sent as the caller's API key. The agent uses the scripted model
// so that the example runs anywhere; give it a real model (for example
// {provider: "openai", name: "gpt-4o-mini", api_key_env: "OPENAI_API_KEY"}) and nothing else
// changes.

import { randomUUID } from "node:crypto";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTOS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");

const { values: options } = parseArgs({
  options: {
    target: { type: "string", default: process.env.AGENTRUN_TARGET ?? "127.0.0.1:50051" },
    agent: { type: "string", default: "node-weather" },
    mode: { type: "string", default: "classic" },
    input: { type: "string", default: "What is the weather in Paris?" },
  },
});

// The contract, loaded from protos/ as it is (no generated code). Field names stay as in the
// .proto files; `kind` names the field set in a oneof.
const definition = protoLoader.loadSync(
  ["agentrun/v1/run_service.proto", "agentrun/v1/agent_service.proto"],
  { includeDirs: [PROTOS], keepCase: true, enums: String, longs: String, defaults: true, oneofs: true },
);
const { agentrun } = grpc.loadPackageDefinition(definition);
const credentials = grpc.credentials.createInsecure();
const runs = new agentrun.v1.RunService(options.target, credentials);
const agents = new agentrun.v1.AgentService(options.target, credentials);
const metadata = new grpc.Metadata();
if (process.env.AGENTRUN_API_KEY) {
  metadata.set("authorization", `Bearer ${process.env.AGENTRUN_API_KEY}`);
}

// The tool this program executes: the model calls it with {"city": ...}.
function weather({ city }) {
  return { city, sky: "clear", temperature_c: 21, reported_by: `node ${process.version}` };
}

const WEATHER_SCHEMA = {
  type: "object",
  properties: { city: { type: "string" } },
  required: ["city"],
  additionalProperties: false,
};

function unary(service, method, request) {
  return new Promise((resolve, reject) => {
    service[method](request, metadata, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// JSON as a google.protobuf.Struct (what proto-loader expects for a Struct field).
function structOf(object) {
  const value = (v) => {
    if (v === null) return { nullValue: "NULL_VALUE" };
    if (Array.isArray(v)) return { listValue: { values: v.map(value) } };
    switch (typeof v) {
      case "string": return { stringValue: v };
      case "number": return { numberValue: v };
      case "boolean": return { boolValue: v };
      default: return { structValue: structOf(v) };
    }
  };
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, value(v)])) };
}

async function ensureAgent() {
  const agent = {
    id: options.agent,
    display_name: "Weather (Node.js client tool example)",
    instructions: "Answer questions about the weather with the weather tool.",
    model: {
      provider: "scripted",
      scripted: {
        turns: [
          {
            text: "Let me look that up.",
            tool_calls: [{ name: "weather", arguments_json: JSON.stringify({ city: "Paris" }) }],
          },
          { text: "It is clear and 21 degrees in Paris.", tool_calls: [] },
        ],
      },
    },
    tools: [
      {
        client: { name: "weather", description: "The weather now in a city.", parameters: structOf(WEATHER_SCHEMA) },
        timeout: { seconds: 300, nanos: 0 },
      },
    ],
  };
  try {
    await unary(agents, "CreateAgent", { agent });
  } catch (error) {
    if (error.code !== grpc.status.ALREADY_EXISTS) throw error;
  }
}

function runToTheEnd() {
  return new Promise((resolve, reject) => {
    const call = runs.StreamRun(
      {
        request_id: randomUUID(), // a repeated start with this id names the same run
        agent_id: options.agent,
        input: options.input,
        execution_mode: `EXECUTION_MODE_${options.mode.toUpperCase()}`,
      },
      metadata,
    );
    let ended = false;
    call.on("data", ({ events }) => {
      for (const event of events) {
        switch (event.kind) {
          case "run_started":
            console.log(`run ${event.run_id} started`);
            break;
          case "client_tool_call_required": {
            const { id, name, arguments_json } = event.client_tool_call_required.tool_call;
            const submit = (output, is_error) =>
              unary(runs, "SubmitToolResult", {
                run_id: event.run_id,
                result: { tool_call_id: id, output, is_error },
              });
            console.log(`executing ${name} ${arguments_json}`);
            let result;
            try {
              if (name !== "weather") throw new Error(`this client has no tool ${name}`);
              result = submit(JSON.stringify(weather(JSON.parse(arguments_json))), false);
            } catch (error) {
              result = submit(String(error), true); // the model reads the error and carries on
            }
            result.catch((error) => {
              call.cancel();
              reject(error);
            });
            break;
          }
          case "tool_result":
            console.log(`tool result: ${event.tool_result.output}`);
            break;
          case "run_completed":
            ended = true;
            resolve(event.run_completed.output);
            break;
          case "run_failed":
          case "run_cancelled":
            ended = true;
            reject(new Error(`the run ended with ${event.kind}: ${JSON.stringify(event[event.kind])}`));
            break;
        }
      }
    });
    call.on("error", reject);
    call.on("end", () => {
      if (!ended) reject(new Error("the stream ended before the run did"));
    });
  });
}

try {
  await ensureAgent();
  const answer = await runToTheEnd();
  console.log(`answer: ${answer}`);
} catch (error) {
  console.error(`failed: ${error.message ?? error}`);
  process.exitCode = 1;
} finally {
  runs.close();
  agents.close();
}
