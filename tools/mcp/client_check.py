"""Drive `sembed mcp` with the official MCP Python SDK (PyPI `mcp`), as an AI coding agent would.

Usage: python client_check.py SEMBED_BINARY FOLDER QUERY SYMBOL MODE [ARG...]

MODE is the SDK's connect mode: `legacy` (the `initialize` handshake of the revisions before
2026-07-28), `auto` (server/discover, falling back to initialize) or a protocol version such as
`2026-07-28` (stateless: no handshake). ARG... are more arguments of `sembed mcp` (e.g. -m MODEL).
Prints one JSON object: the negotiated version, the tools listed, and what each call returned (or
the JSON-RPC error code it got). Timeouts are bounded: a server that hangs fails the check.
"""

import asyncio
import json
import sys

import anyio
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError


def structured(result):
    """The structured content of a tool result, with its error flag."""
    return {
        "is_error": bool(result.is_error),
        "content": result.structured_content,
        "text": [c.text for c in result.content if getattr(c, "type", None) == "text"],
    }


async def error_code(coro):
    try:
        result = await coro
    except MCPError as e:
        return {"code": e.code, "message": e.message}
    return {"result": structured(result)}


async def run(binary, folder, query, symbol, mode, extra):
    params = StdioServerParameters(command=binary, args=["mcp", folder, "--no-refresh", *extra])
    out = {"mode": mode}
    with anyio.fail_after(120):
        async with Client(params, mode=mode, read_timeout_seconds=60) as client:
            out["protocol_version"] = client.protocol_version
            info = client.server_info
            out["server_name"] = info.name if info else None
            tools = await client.list_tools()
            out["tools"] = {
                t.name: {
                    "required": (t.input_schema or {}).get("required", []),
                    "properties": sorted((t.input_schema or {}).get("properties", {})),
                }
                for t in tools.tools
            }
            out["refresh"] = structured(await client.call_tool("refresh_index", {}))
            out["search"] = structured(await client.call_tool("search", {"query": query, "k": 5}))
            out["search_lexical"] = structured(
                await client.call_tool("search", {"query": query, "k": 5, "mode": "lexical"})
            )
            out["search_filtered"] = structured(
                await client.call_tool(
                    "search", {"query": query, "k": 5, "language": "python", "path": "pkg/*"}
                )
            )
            out["lookup"] = structured(await client.call_tool("lookup_symbol", {"name": symbol}))
            out["status"] = structured(await client.call_tool("index_status", {}))
            out["errors"] = {
                "k_not_a_number": await error_code(
                    client.call_tool("search", {"query": query, "k": "ten"})
                ),
                "k_zero": await error_code(client.call_tool("search", {"query": query, "k": 0})),
                "bad_mode": await error_code(
                    client.call_tool("search", {"query": query, "mode": "fuzzy"})
                ),
                "bad_language": await error_code(
                    client.call_tool("search", {"query": query, "language": "cobol"})
                ),
                "missing_query": await error_code(client.call_tool("search", {})),
                "unknown_argument": await error_code(
                    client.call_tool("search", {"query": query, "limit": 3})
                ),
                "unknown_tool": await error_code(client.call_tool("no_such_tool", {})),
            }
            # The session still answers after every error.
            out["after_errors"] = structured(
                await client.call_tool("search", {"query": query, "k": 1})
            )
    return out


def main():
    binary, folder, query, symbol, mode, *extra = sys.argv[1:]
    print(json.dumps(asyncio.run(run(binary, folder, query, symbol, mode, extra))))


if __name__ == "__main__":
    main()
