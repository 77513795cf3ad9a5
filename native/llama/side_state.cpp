// pyllm-kv side state inside llama.cpp's KV cache: the mechanism (see
// pkv/llama_side_state.h for the hooks, side_method.h for what a method
// provides). Per model layer a stack of method slots for K and one for V;
// the table below says which methods a cache type stacks. Compiled into
// libllama; the numerics live in libpyllm_kv_native (pkv/sidestate.h).

#include "pkv/llama_side_state.h"
#include "pkv/ggml_hooks.h"
#include "pkv/sidestate.h"
#include "pkv/ggml_fit_op.h"

#include "side_method.h"

#include "ggml-backend.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

// ---- which methods a cache type stacks on its rows (in order) ----------------

enum class method : uint32_t { deco = 1, squat = 2, center = 3 };

// Order: a transform of the rows (deco), then centering in that domain, then an
// encoder that writes the rows (squat). V: attn_out runs the stack backwards.
std::vector<method> stack_for(ggml_type t, bool is_v, const pkv::side_settings & st) {
    std::vector<method> out;
    const bool squat = PKV_GGML_IS_SQUAT(t);
    // deco* types; squat* on the DecoQuant transform (K, and V, which is then deco storage)
    if (PKV_GGML_IS_DECO(t) || (squat && st.squat_on_deco)) {
        out.push_back(method::deco);
    }
    if (PKV_GGML_IS_OURS(t) && ((is_v ? st.center_v : st.center_k) || (st.center_auto && squat && !is_v))) {
        out.push_back(method::center);
    }
    // SQuat encodes keys; as V a squat type is plain kv storage
    if (squat && !is_v) {
        out.push_back(method::squat);
    }
    return out;
}

std::unique_ptr<pkv::slot> make_slot(method m, const pkv::side_settings & st, const pkv::layer_shape & sh) {
    switch (m) {
        case method::deco:  return pkv::make_deco_slot(st, sh);
        case method::squat: return pkv::make_squat_slot(st, sh);
        case method::center: return pkv::make_center_slot(st, sh);
    }
    throw std::runtime_error("pyllm-kv: unknown side-state method");
}

const char * method_name(method m) {
    return m == method::deco ? "DecoQuant" : m == method::squat ? "SQuat" : "centering";
}

// ---- settings from the environment ---------------------------------------------

std::string env_str(const char * name, const char * def) {
    const char * v = std::getenv(name);
    return (v && *v) ? std::string(v) : std::string(def);
}

bool env_bool(const char * name, const char * def) {
    const std::string v = env_str(name, def);
    if (v == "0") return false;
    if (v == "1") return true;
    throw std::runtime_error(std::string("pyllm-kv: ") + name + " must be 0 or 1, got '" + v + "'");
}

// A number from the environment, whole string parsed, in [lo, hi].
double env_num(const char * name, const char * def, double lo, double hi) {
    const std::string v = env_str(name, def);
    char * end = nullptr;
    const double x = std::strtod(v.c_str(), &end);
    if (end == v.c_str() || *end != '\0' || !std::isfinite(x) || x < lo || x > hi) {
        throw std::runtime_error(std::string("pyllm-kv: ") + name + " must be a number in [" +
                                 std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + v + "'");
    }
    return x;
}

// Only the settings of the methods in use are read (and so can fail).
pkv::side_settings read_settings(bool squat) {
    pkv::side_settings st;
    if (squat) {
        const std::string tr = env_str("PYLLM_KV_SQUAT_TRANSFORM", "hadamard");
        if (tr != "hadamard" && tr != "deco") {
            throw std::runtime_error("pyllm-kv: PYLLM_KV_SQUAT_TRANSFORM must be 'hadamard' or 'deco', got '" + tr + "'");
        }
        st.squat_on_deco   = tr == "deco";
        st.squat_rank      = (int) env_num("PYLLM_KV_SQUAT_RANK", "20", 0, 512);
        st.squat_lambda    = (float) env_num("PYLLM_KV_SQUAT_LAMBDA", "100", 0, 1e12);
        st.squat_normalize = env_bool("PYLLM_KV_SQUAT_NORMALIZE", "1");
        const std::string rf = env_str("PYLLM_KV_SQUAT_REFIT", "first");
        if (rf != "first" && rf != "ubatch") {
            throw std::runtime_error("pyllm-kv: PYLLM_KV_SQUAT_REFIT must be 'first' or 'ubatch', got '" + rf + "'");
        }
        st.squat_refit_ubatch = rf == "ubatch";
        st.squat_fit_trace    = env_bool("PYLLM_KV_FIT_TRACE", "0");
    }
    const std::string gs = env_str("PYLLM_KV_DECO_GROUP", "16");
    if (gs != "16" && gs != "32" && gs != "64") {
        throw std::runtime_error("pyllm-kv: PYLLM_KV_DECO_GROUP must be 16, 32 or 64, got '" + gs + "'");
    }
    st.deco_group = std::atoi(gs.c_str());
    const std::string vs = env_str("PYLLM_KV_DECO_VARIANT", "whiten");
    if (vs != "whiten" && vs != "rotate") {
        throw std::runtime_error("pyllm-kv: PYLLM_KV_DECO_VARIANT must be 'whiten' or 'rotate', got '" + vs + "'");
    }
    st.deco_variant  = vs == "whiten" ? PKV_DECO_WHITEN : PKV_DECO_ROTATE;
    st.deco_hadamard = env_bool("PYLLM_KV_DECO_HADAMARD", "0");
    const std::string c = env_str("PYLLM_KV_CENTER", "auto");
    if (c != "auto" && c != "none" && c != "k" && c != "v" && c != "kv") {
        throw std::runtime_error("pyllm-kv: PYLLM_KV_CENTER must be 'auto', 'none', 'k', 'v' or 'kv', got '" + c + "'");
    }
    st.center_auto = c == "auto";
    st.center_k = c == "k" || c == "kv";
    st.center_v = c == "v" || c == "kv";
    const std::string gf = env_str("PYLLM_KV_GPU_FIT", "center");
    if (gf != "center" && gf != "all" && gf != "none") {
        throw std::runtime_error("pyllm-kv: PYLLM_KV_GPU_FIT must be 'center', 'all' or 'none', got '" + gf + "'");
    }
    st.gpu_fit_center = gf != "none";
    st.gpu_fit_squat = gf == "all";
    return st;
}

std::atomic<uint64_t> g_epoch{ 1 };

} // namespace

// ---- helpers the methods share -------------------------------------------------

namespace pkv {

void bump_epoch() {
    g_epoch.fetch_add(1, std::memory_order_relaxed);
}

size_t pad4(size_t n) { return (n + 3) & ~(size_t) 3; }

bool blob_reader::get(void * dst, size_t n) {
    if ((size_t) (end - p) < n) return false;
    memcpy(dst, p, n);
    p += n;
    return true;
}

const uint8_t * blob_reader::take(size_t n) {
    if ((size_t) (end - p) < n) return nullptr;
    const uint8_t * r = p;
    p += n;
    return r;
}

void blob_writer::put(const void * src, size_t n) {
    memcpy(p, src, n);
    p += n;
}

void blob_writer::zeros(size_t n) {
    memset(p, 0, n);
    p += n;
}

void mark_device_fit(ggml_tensor * op, int kind, int rank, float lambda, int normalize, int64_t fit_rows) {
    GGML_ASSERT(op->op == GGML_OP_CUSTOM);
    // ggml_custom_op_params (ggml-impl.h): function, int n_tasks, userdata; patches/0009 checks the real size
    static_assert(3 * sizeof(void *) <= PKV_FIT_OP_PARAMS_OFFSET, "pkv fit parameters overlap ggml's");
    pkv_fit_op_params p = {};
    p.magic     = PKV_FIT_OP_MAGIC;
    p.kind      = kind;
    p.rank      = rank;
    p.lambda    = lambda;
    p.normalize = normalize;
    p.fit_rows  = fit_rows;
    memcpy((char *) op->op_params + PKV_FIT_OP_PARAMS_OFFSET, &p, sizeof(p));
}

void upload(ggml_tensor * t, const void * data, size_t n) {
    GGML_ASSERT(t && n == ggml_nbytes(t));
    if (t->buffer && t->data && ggml_backend_buffer_get_size(t->buffer) > 0) {
        ggml_backend_tensor_set(t, data, 0, n);
    }
}

void download(const ggml_tensor * t, void * data, size_t n) {
    GGML_ASSERT(t && n == ggml_nbytes(t));
    if (t->buffer && t->data && ggml_backend_buffer_get_size(t->buffer) > 0) {
        ggml_backend_tensor_get(t, data, 0, n);
    }
}

ggml_tensor * apply_group_matrix(ggml_context * ctx, ggml_tensor * x, ggml_tensor * R) {
    const int64_t g = R->ne[0];
    GGML_ASSERT(R->ne[1] == g && ggml_nelements(x) % g == 0);
    ggml_tensor * x2 = ggml_is_contiguous(x) ? ggml_reshape_2d(ctx, x, g, ggml_nelements(x) / g)
                                             : ggml_cont_2d(ctx, x, g, ggml_nelements(x) / g);
    ggml_tensor * y = ggml_mul_mat(ctx, R, x2);
    return ggml_reshape_4d(ctx, y, x->ne[0], x->ne[1], x->ne[2], x->ne[3]);
}

ggml_tensor * as_f32_contiguous(ggml_context * ctx, ggml_tensor * x) {
    if (x->type != GGML_TYPE_F32) {
        x = ggml_cast(ctx, x, GGML_TYPE_F32);
    }
    return ggml_is_contiguous(x) ? x : ggml_cont(ctx, x);
}

} // namespace pkv

// ---- the mechanism -------------------------------------------------------------

namespace {

struct side_slot_ref {
    method m;
    std::unique_ptr<pkv::slot> s;
};

struct side_layer {
    bool present = false;              // this cache holds the layer
    std::vector<side_slot_ref> k, v;   // method stacks, in application order
    // set by attn_in, consumed by the store of the same graph: a store without
    // them means an attention path that never ran the hooks
    bool armed_k = false, armed_v = false;
};

constexpr uint32_t PKV_SIDE_MAGIC   = 0x53564b50; // "PKVS"
constexpr uint32_t PKV_SIDE_VERSION = 3;

struct side_header {
    uint32_t magic, version, n_slots, deco_group, deco_variant, deco_hadamard;
    uint32_t squat_rank, squat_normalize, squat_on_deco;
    float    squat_lambda;
};
// (centering has no settings beyond which stacks hold it: the slot headers say)

// per slot in a state blob, before the method's own bytes (their count: bytes)
struct slot_header {
    uint32_t il, is_v, method, bytes;
};

} // namespace

struct pkv_side_state {
    ggml_type type_k, type_v;
    pkv::side_settings st;
    std::vector<method> stack_k, stack_v;
    std::vector<side_layer> layers; // by model layer id
    std::string desc;

    side_layer & layer(int il) {
        if (il < 0 || il >= (int) layers.size() || !layers[il].present) {
            throw std::runtime_error("pyllm-kv: side state has no layer " + std::to_string(il));
        }
        return layers[il];
    }

    template <class F> void for_each_slot(F f) const {
        for (size_t il = 0; il < layers.size(); ++il) {
            for (const auto & r : layers[il].k) f((int) il, false, r);
            for (const auto & r : layers[il].v) f((int) il, true, r);
        }
    }
};

pkv_side_state * pkv_side_create(ggml_type type_k, ggml_type type_v, int n_layer) {
    const bool squat = PKV_GGML_IS_SQUAT(type_k) || PKV_GGML_IS_SQUAT(type_v);
    if (!PKV_GGML_IS_OURS(type_k) && !PKV_GGML_IS_OURS(type_v)) {
        return nullptr;
    }
    auto s = std::unique_ptr<pkv_side_state>(new pkv_side_state());
    s->type_k  = type_k;
    s->type_v  = type_v;
    s->st      = read_settings(squat);
    s->stack_k = stack_for(type_k, false, s->st);
    s->stack_v = stack_for(type_v, true, s->st);
    if (s->stack_k.empty() && s->stack_v.empty()) {
        return nullptr; // e.g. squat V alone: plain kv storage
    }
    s->layers.resize((size_t) n_layer);

    std::string d;
    auto describe = [&](const char * side, const std::vector<method> & stack) {
        d += side;
        d += ":";
        for (method m : stack) {
            d += " ";
            d += method_name(m);
        }
        if (stack.empty()) {
            d += " none";
        }
        d += "; ";
    };
    describe("K", s->stack_k);
    describe("V", s->stack_v);
    char buf[320];
    snprintf(buf, sizeof(buf), "centering %s%s%s; DecoQuant group %d, variant %s, Hadamard %s; SQuat rank %d, lambda %g%s, on the %s transform",
             s->st.center_auto ? "auto (SQuat keys)" : "", s->st.center_k ? "K" : "",
             s->st.center_v ? "V" : (s->st.center_k || s->st.center_auto ? "" : "off"),
             s->st.deco_group, s->st.deco_variant == PKV_DECO_WHITEN ? "whiten" : "rotate",
             s->st.deco_hadamard ? "kept" : "replaced", s->st.squat_rank, (double) s->st.squat_lambda,
             s->st.squat_normalize ? " (normalised)" : "", s->st.squat_on_deco ? "DecoQuant" : "Hadamard");
    s->desc = "side state " + d + buf;
    return s.release();
}

void pkv_side_free(pkv_side_state * s) {
    delete s;
}

void pkv_side_add_layer(pkv_side_state * s, ggml_context * ctx, int il, int64_t head_dim_k,
                        int64_t head_dim_v, int64_t n_head_kv, bool has_v) {
    if (!s) {
        return;
    }
    if (il < 0 || il >= (int) s->layers.size()) {
        throw std::runtime_error("pyllm-kv: side state for layer " + std::to_string(il) + " out of range");
    }
    if (!s->stack_v.empty() && !has_v) {
        throw std::runtime_error(std::string("pyllm-kv: cache type ") + ggml_type_name(s->type_v) +
                                 " for V needs V rows, but this model's cache stores none (MLA: V is part of K); "
                                 "pick a plain V type");
    }
    side_layer & L = s->layers[(size_t) il];
    L = side_layer();
    L.present = true;
    for (method m : s->stack_k) {
        L.k.push_back({ m, make_slot(m, s->st, { il, false, head_dim_k, n_head_kv, s->type_k }) });
        L.k.back().s->add_tensors(ctx);
    }
    for (method m : s->stack_v) {
        L.v.push_back({ m, make_slot(m, s->st, { il, true, head_dim_v, n_head_kv, s->type_v }) });
        L.v.back().s->add_tensors(ctx);
    }
}

void pkv_side_refuse(const pkv_side_state * s, const char * what) {
    if (!s) {
        return;
    }
    const ggml_type t = s->stack_k.empty() ? s->type_v : s->type_k;
    throw std::runtime_error(std::string("pyllm-kv: cache type ") + ggml_type_name(t) +
                             " keeps side state in the KV cache, which does not support " + what +
                             "; use a plain type (f16, q8_0, q4_0, kv4, ...)");
}

const char * pkv_side_describe(const pkv_side_state * s) {
    return s ? s->desc.c_str() : "none";
}

bool pkv_side_keep_hadamard(const pkv_side_state * s, bool is_v) {
    if (!s) {
        return true;
    }
    const auto & stack = is_v ? s->stack_v : s->stack_k;
    for (method m : stack) {
        if (m == method::deco) {
            return s->st.deco_hadamard;
        }
    }
    return true;
}

void pkv_side_reset(pkv_side_state * s) {
    if (!s) {
        return;
    }
    s->for_each_slot([](int, bool, const side_slot_ref & r) { r.s->reset(); });
    pkv::bump_epoch();
}

uint64_t pkv_side_epoch(void) {
    return g_epoch.load(std::memory_order_relaxed);
}

void pkv_side_attn_in(ggml_context * ctx, pkv_side_state * s, int il,
                      ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v) {
    if (!s) {
        return;
    }
    side_layer & L = s->layer(il);
    if (!L.k.empty()) {
        if (!*k) {
            pkv_side_refuse(s, "layers that read another layer's K/V (KV sharing)");
        }
        pkv::slot * store = L.k.back().s.get();
        const bool fold_center = store->store_takes_key_center();
        for (size_t i = 0; i < L.k.size(); ++i) {
            pkv::slot * r = L.k[i].s.get();
            if (fold_center && i + 2 == L.k.size()) {   // the slot right before the store (side_method.h)
                if (ggml_tensor * mu = r->defer_key_center(ctx, k)) {
                    store->set_key_center(mu);
                    continue;
                }
            }
            r->attn_in_k(ctx, q, k);
        }
        L.armed_k = true;
    }
    if (!L.v.empty() && *v) {
        for (auto & r : L.v) {
            r.s->attn_in_v(ctx, v);
        }
        L.armed_v = true;
    }
}

ggml_tensor * pkv_side_attn_out(ggml_context * ctx, pkv_side_state * s, int il, ggml_tensor * cur) {
    if (!s) {
        return cur;
    }
    side_layer & L = s->layer(il);
    for (auto it = L.v.rbegin(); it != L.v.rend(); ++it) {
        cur = it->s->attn_out(ctx, cur);
    }
    return cur;
}

namespace {
// A store of rows whose cache type needs side state, on a graph path that never
// ran pkv_side_attn_in: refuse instead of storing plain rows.
void check_armed(pkv_side_state * s, side_layer & L, bool is_v) {
    bool & armed = is_v ? L.armed_v : L.armed_k;
    if ((is_v ? L.v : L.k).empty()) {
        return;
    }
    if (!armed) {
        throw std::runtime_error(std::string("pyllm-kv: cache type ") + ggml_type_name(is_v ? s->type_v : s->type_k) +
                                 " needs its side-state hooks on this model's attention path, which pyllm-kv does "
                                 "not wire (e.g. MLA or another memory type); use a plain type "
                                 "(f16, q8_0, q4_0, kv4, ...)");
    }
    armed = false;
}
} // namespace

ggml_tensor * pkv_side_cpy_k(ggml_context * ctx, pkv_side_state * s, int il,
                             ggml_tensor * k_cache, ggml_tensor * k_cur, ggml_tensor * k_idxs) {
    if (!s) {
        return nullptr;
    }
    side_layer & L = s->layer(il);
    check_armed(s, L, false);
    return L.k.empty() ? nullptr : L.k.back().s->store_k(ctx, k_cache, k_cur, k_idxs);
}

void pkv_side_check_cpy_v(pkv_side_state * s, int il) {
    if (s) {
        check_armed(s, s->layer(il), true);
    }
}

ggml_tensor * pkv_side_kshift_undo(ggml_context * ctx, pkv_side_state * s, int il, ggml_tensor * k_f32) {
    if (!s) {
        return k_f32;
    }
    side_layer & L = s->layer(il);
    for (auto it = L.k.rbegin(); it != L.k.rend(); ++it) {
        k_f32 = it->s->kshift_undo(ctx, k_f32);
    }
    return k_f32;
}

ggml_tensor * pkv_side_kshift_redo(ggml_context * ctx, pkv_side_state * s, int il, ggml_tensor * k_f32) {
    if (!s) {
        return k_f32;
    }
    for (auto & r : s->layer(il).k) {
        k_f32 = r.s->kshift_redo(ctx, k_f32);
    }
    return k_f32;
}

// ---- session state ----------------------------------------------------------------
//
// Layout (version 3), all little-endian as in memory:
//   side_header
//   per slot (layers in order, K stack then V stack): slot_header (layer, K/V,
//   method, byte count), the method's bytes

namespace {
side_header header_of(const pkv_side_state * s) {
    uint32_t n = 0;
    s->for_each_slot([&n](int, bool, const side_slot_ref &) { ++n; });
    return { PKV_SIDE_MAGIC, PKV_SIDE_VERSION, n, (uint32_t) s->st.deco_group, (uint32_t) s->st.deco_variant,
             (uint32_t) s->st.deco_hadamard, (uint32_t) s->st.squat_rank, (uint32_t) s->st.squat_normalize,
             (uint32_t) s->st.squat_on_deco, s->st.squat_lambda };
}
} // namespace

size_t pkv_side_state_size(const pkv_side_state * s) {
    if (!s) {
        return 0;
    }
    size_t n = sizeof(side_header);
    s->for_each_slot([&n](int, bool, const side_slot_ref & r) { n += sizeof(slot_header) + r.s->state_size(); });
    return n;
}

void pkv_side_state_get(const pkv_side_state * s, uint8_t * dst) {
    if (!s) {
        return;
    }
    pkv::blob_writer w = { dst };
    const side_header h = header_of(s);
    w.put(&h, sizeof(h));
    s->for_each_slot([&w](int il, bool is_v, const side_slot_ref & r) {
        const slot_header sh = { (uint32_t) il, is_v ? 1u : 0u, (uint32_t) r.m, (uint32_t) r.s->state_size() };
        w.put(&sh, sizeof(sh));
        r.s->state_write(w);
    });
}

const char * pkv_side_state_set(pkv_side_state * s, const uint8_t * src, size_t n, bool replace) {
    if (!s) {
        return n == 0 ? nullptr : "pyllm-kv: the state carries side state (DecoQuant/SQuat) but this context's cache types have none";
    }
    pkv::blob_reader hr = { src, src + n };
    side_header h;
    if (!hr.get(&h, sizeof(h)) || h.magic != PKV_SIDE_MAGIC) {
        return "pyllm-kv: side state in the state is corrupt (bad magic or too short)";
    }
    if (h.version != PKV_SIDE_VERSION) {
        return "pyllm-kv: side state in the state has another version (saved by another pyllm-kv)";
    }
    const side_header mine = header_of(s);
    if (h.deco_group != mine.deco_group || h.deco_variant != mine.deco_variant || h.deco_hadamard != mine.deco_hadamard) {
        return "pyllm-kv: DecoQuant side state in the state was made with other settings "
               "(PYLLM_KV_DECO_GROUP/VARIANT/HADAMARD)";
    }
    if (h.squat_rank != mine.squat_rank || h.squat_normalize != mine.squat_normalize ||
        h.squat_on_deco != mine.squat_on_deco || !(h.squat_lambda == mine.squat_lambda)) {
        return "pyllm-kv: SQuat side state in the state was made with other settings "
               "(PYLLM_KV_SQUAT_RANK/LAMBDA/NORMALIZE/TRANSFORM)";
    }
    if (h.n_slots != mine.n_slots) {
        return "pyllm-kv: side state in the state is for other cache types or layers (different model or formats?)";
    }
    // parse and validate everything first, then commit: on error nothing changed
    for (const bool commit : { false, true }) {
        pkv::blob_reader r = hr;
        const char * err = nullptr;
        s->for_each_slot([&](int il, bool is_v, const side_slot_ref & ref) {
            if (err) {
                return;
            }
            slot_header sh;
            if (!r.get(&sh, sizeof(sh))) {
                err = "pyllm-kv: side state in the state is truncated";
            } else if (sh.il != (uint32_t) il || sh.is_v != (is_v ? 1u : 0u) || sh.method != (uint32_t) ref.m ||
                       sh.bytes != ref.s->state_size()) {
                err = "pyllm-kv: side state in the state is for other cache types, settings or layers "
                      "(different model or formats?)";
            } else {
                err = ref.s->state_read(r, replace, commit);
            }
        });
        if (err) {
            return err; // only possible in the validating pass
        }
        if (r.p != r.end) {
            return "pyllm-kv: side state in the state has trailing bytes (corrupt)";
        }
    }
    pkv::bump_epoch();
    return nullptr;
}
