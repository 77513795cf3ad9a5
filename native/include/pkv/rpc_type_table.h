// pyllm-kv <-> ggml-rpc: both ends of an RPC connection must number ggml types
// alike.
//
// ggml's RPC protocol sends tensors with their `enum ggml_type` id. pyllm-kv
// appends its cache types to that enum (patches/0001), so a pyllm-kv client
// and an unpatched rpc-server (or another pyllm-kv version with other types)
// would read the same id as different types: a K cache of one format stored
// and read as another, i.e. wrong answers. patches/0011 has both ends
// exchange the table below right after ggml's HELLO and refuse each other
// when it differs; this header is what they exchange and what they say.
//
// Include only from ggml-rpc.cpp (C++).
#pragma once

#include "ggml.h"
#include "pkv/ggml_hooks.h"

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace pkv_rpc {

// Set in the padding byte of ggml's HELLO response by a pyllm-kv server
// (an unpatched one leaves it 0): "a type table exchange follows".
constexpr uint8_t hello_mark = 0x70;

// Test hook: a process with this variable set to NAME describes one more
// type than it has ("NAME" at the next id), which makes its table differ
// from an unmodified peer's. tests/test_rpc.py uses it to check the refusal.
constexpr const char * test_extra_type_env = "PYLLM_KV_RPC_TEST_EXTRA_TYPE";

// "<count>|<id>=<name>/<block size>/<type size>;..." for every id below
// GGML_TYPE_COUNT (removed ids included: they keep their slot), e.g.
// "50|0=f32/1/4;1=f16/1/2;2=q4_0/32/18;...;41=kv4/64/36;...".
inline std::string type_table() {
    std::vector<std::string> rows;
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * name = ggml_type_name((enum ggml_type) t);
        rows.push_back(std::to_string(t) + "=" + (name ? name : "-") + "/" +
                       std::to_string((long long) ggml_blck_size((enum ggml_type) t)) + "/" +
                       std::to_string((unsigned long long) ggml_type_size((enum ggml_type) t)));
    }
    const char * extra = std::getenv(test_extra_type_env);
    if (extra && *extra) {
        rows.push_back(std::to_string(GGML_TYPE_COUNT) + "=" + extra + "/1/1");
    }
    std::string s = std::to_string(rows.size()) + "|";
    for (const std::string & r : rows) {
        s += r + ";";
    }
    return s;
}

namespace detail {
inline std::vector<std::string> rows_of(const std::string & table, size_t & count) {
    std::vector<std::string> rows;
    count = 0;
    const size_t bar = table.find('|');
    if (bar == std::string::npos) {
        return rows;
    }
    count = (size_t) std::strtoull(table.substr(0, bar).c_str(), nullptr, 10);
    size_t pos = bar + 1;
    while (pos < table.size()) {
        size_t end = table.find(';', pos);
        if (end == std::string::npos) {
            end = table.size();
        }
        rows.push_back(table.substr(pos, end - pos));
        pos = end + 1;
    }
    return rows;
}

// "f16/1/2" of "1=f16/1/2", or "(none)" past the end
inline std::string type_at(const std::vector<std::string> & rows, size_t i) {
    if (i >= rows.size()) {
        return "(none)";
    }
    const size_t eq = rows[i].find('=');
    return eq == std::string::npos ? rows[i] : rows[i].substr(eq + 1);
}
} // namespace detail

// "" when the tables are equal, else what differs, e.g.
// "this end has 50 ggml types, the other 51; type id 50 is (none) here, fake/1/1 there"
inline std::string type_table_diff(const std::string & mine, const std::string & theirs) {
    if (mine == theirs) {
        return "";
    }
    size_t n_mine = 0, n_theirs = 0;
    const std::vector<std::string> a = detail::rows_of(mine, n_mine);
    const std::vector<std::string> b = detail::rows_of(theirs, n_theirs);
    if (b.empty()) {
        return "the other end sent no ggml type table";
    }
    size_t i = 0;
    while (i < a.size() && i < b.size() && a[i] == b[i]) {
        ++i;
    }
    return "this end has " + std::to_string(n_mine) + " ggml types, the other " + std::to_string(n_theirs) +
           "; type id " + std::to_string(i) + " is " + detail::type_at(a, i) + " here, " + detail::type_at(b, i) +
           " there (types are name/block size/bytes per block)";
}

// for the rpc-server's banner: "50 (pyllm-kv: kv4 kv3 ... squat2)"
inline std::string type_table_summary() {
    std::string ours;
    for (enum ggml_type t : { PKV_GGML_TYPE_LIST }) {
        ours += (ours.empty() ? "" : " ") + std::string(ggml_type_name(t));
    }
    const char * extra = std::getenv(test_extra_type_env);
    return std::to_string((int) GGML_TYPE_COUNT) + " (pyllm-kv: " + ours + ")" +
           (extra && *extra ? std::string(" + test type ") + extra + " (" + test_extra_type_env + ")" : "");
}

// ---- what each end says when it refuses the other ----

inline std::string client_refuses_unpatched(const std::string & endpoint, int major, int minor, int patch) {
    return "pyllm-kv: refusing the RPC server at " + endpoint + ": it speaks ggml RPC " + std::to_string(major) + "." +
           std::to_string(minor) + "." + std::to_string(patch) +
           " but not pyllm-kv's ggml type-table check, so it is not a pyllm-kv rpc-server (an unpatched llama.cpp "
           "ggml-rpc-server, or an older pyllm-kv). pyllm-kv appends its cache types to enum ggml_type, so ggml type "
           "ids on the wire would name different types there. Run the ggml-rpc-server shipped with this pyllm-kv "
           "(pyllm_kv/bin) on that host.";
}

inline std::string client_refuses_table(const std::string & endpoint, const std::string & diff) {
    return "pyllm-kv: refusing the RPC server at " + endpoint +
           ": its ggml type table differs from this client's (" + diff +
           "), so ggml type ids on the wire would name different types. Run the ggml-rpc-server of the same "
           "pyllm-kv build as the client on that host.";
}

inline std::string server_refuses_unchecked_client() {
    return "pyllm-kv rpc-server: refusing a client that did not send its ggml type table (an unpatched llama.cpp, "
           "or an older pyllm-kv): pyllm-kv appends its cache types to enum ggml_type, so ggml type ids on the wire "
           "could name different types. Connect with the pyllm-kv build this server comes from.";
}

inline std::string server_refuses_table(const std::string & diff) {
    return "pyllm-kv rpc-server: refusing a client whose ggml type table differs from this server's (" + diff +
           "): ggml type ids on the wire would name different types. Connect with the pyllm-kv build this server "
           "comes from.";
}

// the server's backend cannot run a node it was sent: computing it anyway could
// store or read something else than the client asked for (e.g. SQuat keys as
// plain blocks), so the graph is refused and the connection closed
inline std::string server_refuses_op(const char * backend, const char * op, const char * type, const char * name) {
    return std::string("pyllm-kv rpc-server: backend ") + backend + " cannot run " + op + " -> " + type + " (node '" +
           name + "'); refusing the graph instead of computing something else. Keep the layer that needs it on a "
           "backend that has it (another server, or the client).";
}

} // namespace pkv_rpc
