//! The MCP server through a real MCP client: the official Python SDK (`mcp` from PyPI,
//! pinned in scripts/requirements-test.txt) drives the real `kontext` binary over streamable
//! HTTP and over stdio (tests/interop/mcp_client.py).

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use support::{free_port, path_str, Kontext};

/// Runs the Python client with `args`; returns what it saw.
fn python_client(args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/mcp_client.py");
    let out: Output = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3 (scripts/install-deps.sh installs the mcp package)");
    assert!(
        out.status.success(),
        "the Python MCP client failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the client printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// What every transport must show the client.
fn assert_client_saw_the_tools_work(seen: &Value) {
    assert_eq!(seen["server"]["name"], "kontext", "{}", seen["server"]);
    assert_eq!(seen["server"]["tools_capability"], true);
    assert!(seen["server"]["instructions"]
        .as_str()
        .unwrap()
        .contains("describe_entity_types"));

    // Tools, with descriptions and input schemas a model can act on.
    let tools = seen["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "describe_entity_types",
            "get_entity_context",
            "list_entities"
        ]
    );
    for tool in tools {
        assert!(tool["description"].as_str().unwrap().len() > 80, "{tool}");
        assert_eq!(tool["inputSchema"]["type"], "object", "{tool}");
        assert_eq!(tool["annotations"]["readOnlyHint"], true, "{tool}");
    }
    assert_eq!(
        tools[1]["inputSchema"]["required"],
        json!(["entity_type", "entity_id"])
    );

    // describe_entity_types: the four types of the customer-service pipeline, related.
    let describe = &seen["describe"];
    assert_eq!(describe["is_error"], false, "{describe}");
    let types = describe["structured"]["entity_types"].as_array().unwrap();
    let names: Vec<&str> = types
        .iter()
        .map(|t| t["entity_type"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["customer", "interaction", "order", "ticket"]);
    let customer = &types[0];
    assert_eq!(customer["key"], "customer_id");
    assert_eq!(customer["topic"], "context.customers");
    assert_eq!(customer["fields"]["given_name"], json!(["billing", "crm"]));
    let children: Vec<&str> = customer["has_many"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["entity_type"].as_str().unwrap())
        .collect();
    assert_eq!(children, ["interaction", "order", "ticket"]);
    assert_eq!(types[2]["belongs_to"][0]["entity_type"], "customer");
    assert!(!customer["example_ids"].as_array().unwrap().is_empty());

    // list_entities pages ids.
    let list = &seen["list"];
    assert_eq!(list["is_error"], false, "{list}");
    let ids = list["structured"]["ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 5, "{list}");
    assert_eq!(ids[0], seen["customer"]);

    // get_entity_context: fields, each with provenance; the same JSON as text.
    let context = &seen["context"];
    assert_eq!(context["is_error"], false, "{context}");
    let doc = &context["structured"];
    assert_eq!(doc["entity_id"], seen["customer"]);
    let fields = doc["fields"].as_object().unwrap();
    assert!(!fields.is_empty(), "{doc}");
    for field in fields.keys() {
        let p = &doc["provenance"][field];
        for key in [
            "source",
            "event_id",
            "topic",
            "partition",
            "offset",
            "event_time",
        ] {
            assert!(!p[key].is_null(), "{field}'s provenance lacks {key}: {p}");
        }
    }
    assert_eq!(
        serde_json::from_str::<Value>(context["text"].as_str().unwrap()).unwrap(),
        *doc
    );

    // markdown within a token budget: text about the customer, no JSON.
    let markdown = &seen["markdown"];
    assert_eq!(markdown["is_error"], false, "{markdown}");
    assert!(markdown["structured"].is_null(), "{markdown}");
    assert!(
        markdown["text"]
            .as_str()
            .unwrap()
            .contains(seen["customer"].as_str().unwrap()),
        "{markdown}"
    );

    // fields narrows the entity's own fields.
    let narrowed = &seen["only_given_name"];
    assert_eq!(narrowed["is_error"], false, "{narrowed}");
    let kept: Vec<&String> = narrowed["structured"]["fields"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert!(kept.iter().all(|k| *k == "given_name"), "{narrowed}");

    // Failures are tool errors with the HTTP API's stable codes.
    for (call, code) in [
        ("not_found", "entity_not_found"),
        ("unknown_type", "unknown_entity_type"),
        ("invalid_limit", "invalid_limit"),
    ] {
        let result = &seen[call];
        assert_eq!(result["is_error"], true, "{call}: {result}");
        assert_eq!(
            result["structured"]["error"]["code"], code,
            "{call}: {result}"
        );
        assert!(
            result["text"].as_str().unwrap().contains(code),
            "{call}: {result}"
        );
    }
}

#[test]
fn python_mcp_client_uses_the_tools_over_streamable_http() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let mut kontext = Kontext::spawn(&[
        "quickstart",
        "--data-dir",
        path_str(dir.path()),
        "--port",
        &port,
    ]);
    let line = kontext.wait_for_line("MCP clients: streamable HTTP at ", Duration::from_secs(60));
    let url = line.rsplit(' ').next().unwrap().to_string();
    assert_eq!(url, format!("http://127.0.0.1:{port}/mcp"));
    let seen = python_client(&["http", &url]);
    assert_client_saw_the_tools_work(&seen);
    kontext.interrupt();
}

/// The client launches `kontext quickstart --mcp-stdio` itself, as Claude Desktop would; stdout
/// must carry nothing but MCP, and closing stdin must stop the pipeline cleanly.
#[test]
fn python_mcp_client_launches_the_pipeline_and_uses_the_tools_over_stdio() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let seen = python_client(&[
        "stdio",
        "--",
        env!("CARGO_BIN_EXE_kontext"),
        "quickstart",
        "--mcp-stdio",
        "--data-dir",
        path_str(dir.path()),
        "--port",
        &port,
    ]);
    assert_client_saw_the_tools_work(&seen);
    // The client closed stdin and waited for the server to exit: the store is closed, so a new
    // process can open the same data directory at once.
    let mut again = Kontext::spawn(&[
        "quickstart",
        "--data-dir",
        path_str(dir.path()),
        "--port",
        &free_port().to_string(),
        "--no-generator",
    ]);
    again.wait_for_line("curl -s http://", Duration::from_secs(60));
    again.interrupt();
}
