#!/usr/bin/env python3
"""Drives kontext's MCP server with the official Python MCP SDK (the `mcp` package).

    mcp_client.py http http://127.0.0.1:8080/mcp
    mcp_client.py stdio -- /path/to/kontext quickstart --mcp-stdio --data-dir D --port P

Connects (streamable HTTP, or stdio by launching the command), initializes, lists the tools,
calls each of them, and prints one JSON object with what it saw on stdout, for the Rust test
(crates/kontext-cli/tests/mcp_client.rs) to assert on. Diagnostics go to stderr.
"""

import argparse
import asyncio
import json
import sys
import time

from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

# How long to wait for the pipeline to have a customer (stdio starts it from scratch).
READY_TIMEOUT_S = 60.0


def call_summary(result):
    """The parts of a CallToolResult the test checks, as plain JSON."""
    texts = [c.text for c in result.content if getattr(c, "type", None) == "text"]
    return {
        "is_error": bool(result.is_error),
        "structured": result.structured_content,
        "text": "\n".join(texts),
    }


async def first_customer(session):
    """Polls list_entities until the store has a customer; returns its id."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        page = await session.call_tool("list_entities", {"entity_type": "customer", "limit": 1})
        ids = (page.structured_content or {}).get("ids") or []
        if ids:
            return ids[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"no customer within {READY_TIMEOUT_S} s: {call_summary(page)}")
        await asyncio.sleep(0.2)


async def exercise(session):
    init = await session.initialize()
    tools = await session.list_tools()
    customer = await first_customer(session)
    out = {
        "server": {
            "name": init.server_info.name,
            "version": init.server_info.version,
            "protocol_version": init.protocol_version,
            "instructions": init.instructions,
            "tools_capability": init.capabilities.tools is not None,
        },
        "tools": [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools.tools
        ],
        "customer": customer,
        "describe": call_summary(await session.call_tool("describe_entity_types", {})),
        "list": call_summary(
            await session.call_tool("list_entities", {"entity_type": "customer", "limit": 5})
        ),
        "context": call_summary(
            await session.call_tool(
                "get_entity_context", {"entity_type": "customer", "entity_id": customer}
            )
        ),
        "markdown": call_summary(
            await session.call_tool(
                "get_entity_context",
                {
                    "entity_type": "customer",
                    "entity_id": customer,
                    "format": "markdown",
                    "max_tokens": 300,
                },
            )
        ),
        "only_given_name": call_summary(
            await session.call_tool(
                "get_entity_context",
                {"entity_type": "customer", "entity_id": customer, "fields": ["given_name"]},
            )
        ),
        "not_found": call_summary(
            await session.call_tool(
                "get_entity_context", {"entity_type": "customer", "entity_id": "C-NOPE"}
            )
        ),
        "unknown_type": call_summary(
            await session.call_tool("list_entities", {"entity_type": "planet"})
        ),
        "invalid_limit": call_summary(
            await session.call_tool("list_entities", {"entity_type": "customer", "limit": 0})
        ),
    }
    return out


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="transport", required=True)
    http = sub.add_parser("http")
    http.add_argument("url")
    stdio = sub.add_parser("stdio")
    stdio.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    if args.transport == "http":
        async with streamable_http_client(args.url) as (read, write):
            async with ClientSession(read, write) as session:
                out = await exercise(session)
    else:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        params = StdioServerParameters(command=command[0], args=command[1:])
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                out = await exercise(session)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    asyncio.run(main())
