// pyllm-kv side state inside llama.cpp's KV cache (see pkv/llama_side_state.h).
// Compiled into libllama; the numerics are pkv_deco_fit() in libpyllm_kv_native.

#include "pkv/llama_side_state.h"
#include "pkv/ggml_hooks.h"
#include "pkv/sidestate.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

struct pkv_side_state;

namespace {

constexpr uint32_t PKV_SIDE_MAGIC   = 0x53564b50; // "PKVS"
constexpr uint32_t PKV_SIDE_VERSION = 2;
constexpr int      PKV_SIDE_NMATS   = 3;          // QUERY, ENCODE, DECODE

// One layer's K (or V) matrices, in ggml's mul_mat orientation: y = R x for a
// group x of g values, R row-major g x g. With the row-vector convention of
// pkv_deco_fit (x = u S, u = x S^-1):
//   QUERY  R = S        (q S^T)
//   ENCODE R = S^-1^T   (x S^-1)
//   DECODE R = S^T      (u S)
struct pkv_side_slot {
    pkv_side_state   * owner  = nullptr;
    bool               active = false; // DecoQuant transform on this layer's K (or V)
    bool               fitted = false;
    std::vector<float> mats;           // PKV_SIDE_NMATS * g * g

    // SQuat (K slots of squat* types): per KV head, the upper Cholesky factor U
    // of A^-1 (pkv_squat_prepare), kept packed in fp16 (pkv_squat_pack:
    // d(d+1)/2 values per head). Sized at the first graph build (the head count
    // and size come from the tensors), identity until the head is fitted. Each
    // head has its own flag because the fit op runs its heads on several threads.
    int                   squat_bits = 0;  // 0: no SQuat on this slot
    int                   n_head     = 0;
    int                   d          = 0;
    std::vector<uint16_t> U;               // n_head * packed_len(d)
    std::vector<uint8_t>  head_fitted;     // n_head
    // The fit op's output (U of every head, packed fp16) in the graph being
    // built: made by pkv_side_attn_in, consumed by pkv_side_cpy_k of the same layer.
    ggml_tensor *         U_graph    = nullptr;

    size_t packed() const { return pkv_squat_packed_len(d); }

    bool squat() const { return squat_bits != 0; }
};

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

bool env_hadamard() {
    return env_bool("PYLLM_KV_DECO_HADAMARD", "0");
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

// SQuat runs on the deco transform instead of upstream's Hadamard rotation?
bool env_squat_on_deco() {
    const std::string v = env_str("PYLLM_KV_SQUAT_TRANSFORM", "hadamard");
    if (v == "hadamard") return false;
    if (v == "deco") return true;
    throw std::runtime_error("pyllm-kv: PYLLM_KV_SQUAT_TRANSFORM must be 'hadamard' or 'deco', got '" + v + "'");
}

int squat_bits_of(ggml_type t) {
    return PKV_GGML_IS_SQUAT(t) ? PKV_GGML_BITS(t) : 0;
}

// Every head of the slot back to U = I (plain encoding) and unfitted. Packed
// row j starts with its diagonal entry (pkv_squat_pack's layout).
void squat_set_identity(pkv_side_slot & sl) {
    const uint16_t one = pkv_fp32_to_fp16(1.0f);
    sl.U.assign((size_t) sl.n_head * sl.packed(), 0);
    for (int h = 0; h < sl.n_head; ++h) {
        uint16_t * u = sl.U.data() + (size_t) h * sl.packed();
        size_t row = 0;
        for (int j = 0; j < sl.d; ++j) {
            u[row] = one;
            row += (size_t) (sl.d - j);
        }
    }
    sl.head_fitted.assign((size_t) sl.n_head, 0);
}

} // namespace

struct pkv_side_state {
    ggml_type type_k, type_v;
    int  n_layer  = 0;
    int  g        = 16;
    int  variant  = PKV_DECO_WHITEN;
    bool hadamard = false;
    // SQuat settings (PYLLM_KV_SQUAT_RANK/LAMBDA/NORMALIZE/TRANSFORM)
    int   squat_rank      = 20;
    float squat_lambda    = 100.0f;
    bool  squat_normalize = true;
    bool  squat_on_deco   = false;
    std::vector<pkv_side_slot> slots; // 2 per model layer: K then V; never resized after create
    std::string desc;

    void set_identity(pkv_side_slot & sl) const {
        sl.mats.assign((size_t) PKV_SIDE_NMATS * g * g, 0.0f);
        for (int m = 0; m < PKV_SIDE_NMATS; ++m) {
            for (int i = 0; i < g; ++i) {
                sl.mats[(size_t) m * g * g + (size_t) i * g + i] = 1.0f;
            }
        }
    }
};

pkv_side_state * pkv_side_create(ggml_type type_k, ggml_type type_v, int n_layer,
                                 int64_t head_dim_k, int64_t head_dim_v) {
    const int  squat_k = squat_bits_of(type_k);
    // SQuat on the DecoQuant transform: every squat type, K or V, then gets the
    // deco transform (for V that is deco storage), matching pkv_side_keep_hadamard
    const bool on_deco = (squat_k || PKV_GGML_IS_SQUAT(type_v)) && env_squat_on_deco();
    bool deco_k = PKV_GGML_IS_DECO(type_k) || (squat_k && on_deco);
    const bool deco_v = PKV_GGML_IS_DECO(type_v) || (PKV_GGML_IS_SQUAT(type_v) && on_deco);
    if (!deco_k && !deco_v && !squat_k) {
        return nullptr;
    }

    auto s = new pkv_side_state();
    try {
        if (squat_k) {
            s->squat_rank      = (int) env_num("PYLLM_KV_SQUAT_RANK", "20", 0, 512);
            s->squat_lambda    = (float) env_num("PYLLM_KV_SQUAT_LAMBDA", "100", 0, 1e12);
            s->squat_normalize = env_bool("PYLLM_KV_SQUAT_NORMALIZE", "1");
            s->squat_on_deco   = on_deco;
            if (head_dim_k <= 0 || head_dim_k % PKV_BLOCK != 0 || head_dim_k > PKV_LINALG_MAX_N) {
                throw std::runtime_error("pyllm-kv: cache type " + std::string(ggml_type_name(type_k)) +
                    " needs a K head size that is a multiple of " + std::to_string(PKV_BLOCK) +
                    " and at most " + std::to_string(PKV_LINALG_MAX_N) +
                    " (this model: " + std::to_string(head_dim_k) + ")");
            }
        }
        s->type_k  = type_k;
        s->type_v  = type_v;
        s->n_layer = n_layer;

        const std::string gs = env_str("PYLLM_KV_DECO_GROUP", "16");
        if (gs == "16" || gs == "32" || gs == "64") {
            s->g = std::atoi(gs.c_str());
        } else {
            throw std::runtime_error("pyllm-kv: PYLLM_KV_DECO_GROUP must be 16, 32 or 64, got '" + gs + "'");
        }
        const std::string vs = env_str("PYLLM_KV_DECO_VARIANT", "whiten");
        if (vs == "whiten") {
            s->variant = PKV_DECO_WHITEN;
        } else if (vs == "rotate") {
            s->variant = PKV_DECO_ROTATE;
        } else {
            throw std::runtime_error("pyllm-kv: PYLLM_KV_DECO_VARIANT must be 'whiten' or 'rotate', got '" + vs + "'");
        }
        s->hadamard = env_hadamard();

        // groups must not straddle two heads: the same S serves every head
        if (deco_k && (head_dim_k <= 0 || head_dim_k % s->g != 0)) {
            throw std::runtime_error("pyllm-kv: cache type " + std::string(ggml_type_name(type_k)) +
                " needs a K head size that is a multiple of " + std::to_string(s->g) +
                " (this model: " + std::to_string(head_dim_k) + ")");
        }
        if (deco_v && (head_dim_v <= 0 || head_dim_v % s->g != 0)) {
            throw std::runtime_error("pyllm-kv: cache type " + std::string(ggml_type_name(type_v)) +
                " needs a V head size that is a multiple of " + std::to_string(s->g) +
                " (this model: " + std::to_string(head_dim_v) + ")");
        }

        s->slots.resize((size_t) 2 * n_layer);
        for (int il = 0; il < n_layer; ++il) {
            s->slots[2 * il + 0].active     = deco_k;
            s->slots[2 * il + 0].squat_bits = squat_k;
            s->slots[2 * il + 1].active     = deco_v;
        }
        for (auto & sl : s->slots) {
            sl.owner = s;
            s->set_identity(sl);
        }

        char buf[384];
        int n = 0;
        if (deco_k || deco_v) {
            n += snprintf(buf + n, sizeof(buf) - n, "DecoQuant side state: K %s, V %s, group %d, variant %s, Hadamard %s; ",
                     deco_k ? "on" : "off", deco_v ? "on" : "off", s->g,
                     s->variant == PKV_DECO_WHITEN ? "whiten" : "rotate", s->hadamard ? "kept" : "replaced");
        }
        if (squat_k) {
            n += snprintf(buf + n, sizeof(buf) - n, "SQuat keys: %d bits, rank %d, lambda %g%s, on the %s transform; ",
                     squat_k, s->squat_rank, (double) s->squat_lambda, s->squat_normalize ? " (normalised)" : "",
                     s->squat_on_deco ? "DecoQuant" : "Hadamard");
        }
        snprintf(buf + n, sizeof(buf) - n, "%d layers", n_layer);
        s->desc = buf;
    } catch (...) {
        delete s;
        throw;
    }
    return s;
}

void pkv_side_free(pkv_side_state * s) {
    delete s;
}

const char * pkv_side_describe(const pkv_side_state * s) {
    return s ? s->desc.c_str() : "none";
}

bool pkv_side_keep_hadamard(ggml_type type) {
    const bool deco = PKV_GGML_IS_DECO(type) || (PKV_GGML_IS_SQUAT(type) && env_squat_on_deco());
    if (!deco) {
        return true;
    }
    return env_hadamard();
}

void pkv_side_reset(pkv_side_state * s) {
    if (!s) {
        return;
    }
    for (auto & sl : s->slots) {
        if (sl.fitted) {
            s->set_identity(sl);
            sl.fitted = false;
        }
        if (sl.squat()) {
            squat_set_identity(sl);
        }
    }
}

namespace {

// Fit the slot from its first ubatch, then (every ubatch) hand out its matrices.
// Runs on the CPU, one task: the fit is a 16x16 (or 64x64) problem.
void pkv_side_fit_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) nth;
    if (ith != 0) {
        return;
    }
    auto * sl = static_cast<pkv_side_slot *>(userdata);
    const pkv_side_state * s = sl->owner;
    const int g = s->g;

    const ggml_tensor * x = dst->src[0];
    if (x && !sl->fitted) {
        GGML_ASSERT(x->type == GGML_TYPE_F32 && ggml_is_contiguous(x));
        const int64_t row_len = x->ne[0] * x->ne[1];         // one token, all heads
        const int64_t n_rows  = ggml_nelements(x) / row_len;
        std::vector<float> S((size_t) g * g), Sinv((size_t) g * g);
        if (pkv_deco_fit((const float *) x->data, n_rows, row_len, row_len, g, s->variant,
                         S.data(), Sinv.data()) == 0) {
            float * q   = sl->mats.data();
            float * enc = q + (size_t) g * g;
            float * dec = enc + (size_t) g * g;
            for (int i = 0; i < g; ++i) {
                for (int j = 0; j < g; ++j) {
                    q  [(size_t) i * g + j] = S   [(size_t) i * g + j];
                    enc[(size_t) i * g + j] = Sinv[(size_t) j * g + i];
                    dec[(size_t) i * g + j] = S   [(size_t) j * g + i];
                }
            }
        } // else: invalid input shape; the slot keeps the identity (= plain kv storage)
        sl->fitted = true;
    }
    memcpy(dst->data, sl->mats.data(), sl->mats.size() * sizeof(float));
}

ggml_tensor * make_op(ggml_context * ctx, pkv_side_state * s, pkv_side_slot * sl, ggml_tensor * x) {
    ggml_tensor * args[1] = { x };
    // without x (K-shift) the op only hands out what the slot holds
    return ggml_custom_4d(ctx, GGML_TYPE_F32, s->g, s->g, PKV_SIDE_NMATS, 1,
                          args, x ? 1 : 0, pkv_side_fit_op, 1, sl);
}

// The layer's K (or V) slot if it has a DecoQuant transform (squat: false) or
// a SQuat encoder (squat: true); nullptr otherwise.
pkv_side_slot * slot_of(pkv_side_state * s, int il, bool is_v, bool squat = false) {
    if (!s || il < 0 || il >= s->n_layer) {
        return nullptr;
    }
    pkv_side_slot * sl = &s->slots[(size_t) 2 * il + (is_v ? 1 : 0)];
    return (squat ? sl->squat() : sl->active) ? sl : nullptr;
}

// SQuat, first ubatch of each slot: the query subspace of every KV head from
// the (rotated) queries of its GQA group, then U = chol(A^-1). Every ubatch:
// the output is U of every head as the slot keeps it (packed fp16, F16 tensor
// [packed_len(d), n_head]); the key encoder (pkv_squat_store_op on the CPU,
// set_rows on CUDA) reads it from there, so it cannot run before the fit and,
// on a GPU, gets U as an ordinary graph input. src[0]: the queries (f32).
// Threads split the heads.
void pkv_squat_fit_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    auto * sl = static_cast<pkv_side_slot *>(userdata);
    const pkv_side_state * s = sl->owner;
    const ggml_tensor * q = dst->src[0];

    const int     d      = sl->d;
    const int64_t n_head = q->ne[1];
    const int64_t n_tok  = q->ne[2] * q->ne[3];
    const int64_t n_gqa  = n_head / sl->n_head;
    for (int h = ith; h < sl->n_head; h += nth) {
        uint16_t * Uh = sl->U.data() + (size_t) h * sl->packed();
        if (!sl->head_fitted[h]) {
            // rows: every token's queries of the heads that read KV head h
            std::vector<float> rows((size_t) (n_tok * n_gqa * d));
            for (int64_t t = 0; t < n_tok; ++t) {
                for (int64_t i = 0; i < n_gqa; ++i) {
                    const float * src = (const float *) q->data + (t * n_head + h * n_gqa + i) * d;
                    memcpy(rows.data() + (t * n_gqa + i) * d, src, (size_t) d * sizeof(float));
                }
            }
            // on failure pkv_squat_prepare leaves U = I: this head is then plain kv
            std::vector<float> U((size_t) d * d);
            pkv_squat_prepare(rows.data(), n_tok * n_gqa, d, s->squat_rank, s->squat_lambda,
                              s->squat_normalize ? 1 : 0, U.data());
            pkv_squat_pack(U.data(), d, Uh);
            sl->head_fitted[h] = 1;
        }
        memcpy((char *) dst->data + (size_t) h * dst->nb[1], Uh, sl->packed() * sizeof(uint16_t));
    }
}

// SQuat encoder on the CPU, writing K rows straight into a host cache: src[0]
// K rows (f32, n_embd_gqa x n_tokens), src[1] the cache row of each token
// (I32/I64), src[2] the cache (n_embd_gqa x cells), src[3] U of every head
// (pkv_squat_fit_op's output). Threads split the tokens.
void pkv_squat_store_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * sl = static_cast<const pkv_side_slot *>(userdata);
    const ggml_tensor * k     = dst->src[0];
    const ggml_tensor * idx   = dst->src[1];
    const ggml_tensor * cache = dst->src[2];
    const ggml_tensor * Ut    = dst->src[3];

    const int     d      = sl->d;
    const int64_t n_tok  = k->ne[1];
    const size_t  head_b = (size_t) (d / PKV_BLOCK) * pkv_block_bytes(sl->squat_bits);
    if (ith >= n_tok) {
        return;
    }
    // this thread's dense copy of every head's U (the encoder reads rows of it);
    // thread_local so that decode does not allocate per layer and token
    thread_local std::vector<float> U;
    U.resize((size_t) sl->n_head * d * d);
    for (int h = 0; h < sl->n_head; ++h) {
        pkv_squat_unpack((const uint16_t *) ((const char *) Ut->data + (size_t) h * Ut->nb[1]), d,
                         U.data() + (size_t) h * d * d);
    }
    for (int64_t t = ith; t < n_tok; t += nth) {
        const int64_t row = idx->type == GGML_TYPE_I64 ? ((const int64_t *) idx->data)[t]
                                                       : (int64_t) ((const int32_t *) idx->data)[t];
        GGML_ASSERT(row >= 0 && row < cache->ne[1]);
        const float * src = (const float *) ((const char *) k->data + t * k->nb[1]);
        char * out = (char *) cache->data + row * cache->nb[1];
        for (int h = 0; h < sl->n_head; ++h) {
            pkv_squat_quantize_row(sl->squat_bits, src + (size_t) h * d, U.data() + (size_t) h * d * d,
                                   d, out + h * head_b);
        }
    }
}

ggml_tensor * apply(ggml_context * ctx, ggml_tensor * x, ggml_tensor * mats, pkv_side_which which) {
    const int64_t g = mats->ne[0];
    GGML_ASSERT(ggml_nelements(x) % g == 0);
    ggml_tensor * x2 = ggml_is_contiguous(x) ? ggml_reshape_2d(ctx, x, g, ggml_nelements(x) / g)
                                             : ggml_cont_2d(ctx, x, g, ggml_nelements(x) / g);
    ggml_tensor * r  = ggml_view_2d(ctx, mats, g, g, mats->nb[1], (size_t) which * mats->nb[2]);
    ggml_tensor * y  = ggml_mul_mat(ctx, r, x2);
    return ggml_reshape_4d(ctx, y, x->ne[0], x->ne[1], x->ne[2], x->ne[3]);
}

ggml_tensor * as_f32_contiguous(ggml_context * ctx, ggml_tensor * x) {
    if (x->type != GGML_TYPE_F32) {
        x = ggml_cast(ctx, x, GGML_TYPE_F32);
    }
    return ggml_is_contiguous(x) ? x : ggml_cont(ctx, x);
}

} // namespace

ggml_tensor * pkv_side_attn_in(ggml_context * ctx, pkv_side_state * s, int il,
                               ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v) {
    if (pkv_side_slot * sk = slot_of(s, il, false)) {
        *k = as_f32_contiguous(ctx, *k);
        ggml_tensor * mk = make_op(ctx, s, sk, *k);
        *q = apply(ctx, *q, mk, PKV_SIDE_QUERY);
        *k = apply(ctx, *k, mk, PKV_SIDE_ENCODE);
    }
    if (pkv_side_slot * sq = slot_of(s, il, false, true)) {
        // SQuat: the queries as attention will see them (after Hadamard or deco)
        ggml_tensor * qc = as_f32_contiguous(ctx, *q);
        const int64_t d = (*k)->ne[0], n_head_kv = (*k)->ne[1];
        if (qc->ne[0] != d || n_head_kv < 1 || qc->ne[1] % n_head_kv != 0) {
            throw std::runtime_error("pyllm-kv: SQuat needs queries and keys of the same head size and a "
                                     "whole number of query heads per KV head");
        }
        if (sq->n_head == 0) {            // first graph: size the slot from the tensors
            sq->n_head = (int) n_head_kv;
            sq->d      = (int) d;
            squat_set_identity(*sq);
        } else if (sq->n_head != n_head_kv || sq->d != d) {
            throw std::runtime_error("pyllm-kv: SQuat side state was made for another head layout");
        }
        ggml_tensor * args[1] = { qc };
        sq->U_graph = ggml_custom_4d(ctx, GGML_TYPE_F16, (int64_t) sq->packed(), sq->n_head, 1, 1,
                                     args, 1, pkv_squat_fit_op, GGML_N_TASKS_MAX, sq);
    }
    ggml_tensor * mv = nullptr;
    if (pkv_side_slot * sv = slot_of(s, il, true)) {
        *v = as_f32_contiguous(ctx, *v);
        mv = make_op(ctx, s, sv, *v);
        *v = apply(ctx, *v, mv, PKV_SIDE_ENCODE);
    }
    return mv;
}

ggml_tensor * pkv_side_attn_out(ggml_context * ctx, ggml_tensor * v_mats, ggml_tensor * cur) {
    return v_mats ? apply(ctx, cur, v_mats, PKV_SIDE_DECODE) : cur;
}

ggml_tensor * pkv_side_cpy_k(ggml_context * ctx, pkv_side_state * s, int il,
                             ggml_tensor * k_cache, ggml_tensor * k_cur, ggml_tensor * k_idxs) {
    pkv_side_slot * sq = slot_of(s, il, false, true);
    if (!sq || sq->n_head == 0 || !sq->U_graph) {
        return nullptr; // not squat, or K never went through build_attn's hook (then plain)
    }
    ggml_tensor * U = sq->U_graph;
    sq->U_graph = nullptr;
    if (!PKV_GGML_IS_SQUAT(k_cache->type) || k_cache->ne[0] != (int64_t) sq->n_head * sq->d) {
        throw std::runtime_error("pyllm-kv: SQuat K cache does not match its side state");
    }
    if (k_cur->type != GGML_TYPE_F32) {
        k_cur = ggml_cast(ctx, k_cur, GGML_TYPE_F32);
    }
    const ggml_tensor * base = k_cache;
    while (base->view_src) {
        base = base->view_src;
    }
    if (!base->buffer || ggml_backend_buffer_is_host(base->buffer)) {
        ggml_tensor * args[4] = { k_cur, k_idxs, k_cache, U };
        return ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, 4, pkv_squat_store_op, GGML_N_TASKS_MAX, sq);
    }
    // Cache in device memory: set_rows with U as an extra source, which the
    // CUDA backend encodes with the SQuat encoder (patches/0009, native/cuda);
    // a backend without it refuses the op (supports_op) instead of storing plain.
    if (!PKV_SQUAT_GPU_HEAD_DIM_OK(sq->d)) {
        throw std::runtime_error("pyllm-kv: SQuat keys in GPU memory need head size 64, 128 or 256 (this model: " +
                                 std::to_string(sq->d) + "); keep the KV cache on the CPU (offload_kqv=False, "
                                 "llama.cpp -nkvo)");
    }
    ggml_tensor * t = ggml_set_rows(ctx, k_cache, k_cur, k_idxs);
    t->src[3] = U;
    return t;
}

ggml_tensor * pkv_side_kshift_undo(ggml_context * ctx, pkv_side_state * s, int il, ggml_tensor * k_f32) {
    pkv_side_slot * sk = slot_of(s, il, false);
    return sk ? apply(ctx, k_f32, make_op(ctx, s, sk, nullptr), PKV_SIDE_DECODE) : k_f32;
}

ggml_tensor * pkv_side_kshift_redo(ggml_context * ctx, pkv_side_state * s, int il, ggml_tensor * k_f32) {
    pkv_side_slot * sk = slot_of(s, il, false);
    return sk ? apply(ctx, k_f32, make_op(ctx, s, sk, nullptr), PKV_SIDE_ENCODE) : k_f32;
}

// ---- session state ----------------------------------------------------------------
//
// Layout (version 2), all little-endian as in memory:
//   header (pkv_side_header)
//   per slot (2 per layer, K then V):
//     u32 deco_fitted, float mats[3 g g]            (identity when unused)
//     u32 n_head, u32 d                             (SQuat; 0, 0 when not sized)
//     u8  head_fitted[n_head], zero-padded to 4 bytes
//     u16 U[n_head d(d+1)/2] (packed fp16, pkv_squat_pack), zero-padded to 4 bytes

namespace {
struct pkv_side_header {
    uint32_t magic, version, n_slots, g, variant, hadamard;
    uint32_t squat_rank, squat_normalize, squat_on_deco;
    float    squat_lambda;
};

size_t pad4(size_t n) { return (n + 3) & ~(size_t) 3; }

size_t u_bytes(uint32_t n_head, uint32_t d) {
    return pad4((size_t) n_head * pkv_squat_packed_len((int) d) * sizeof(uint16_t));
}

size_t slot_bytes(const pkv_side_state * s, uint32_t n_head, uint32_t d) {
    return sizeof(uint32_t) + (size_t) PKV_SIDE_NMATS * s->g * s->g * sizeof(float) +
           2 * sizeof(uint32_t) + pad4(n_head) + u_bytes(n_head, d);
}

// a bounded reader: every read is checked against the blob's end
struct reader {
    const uint8_t * p, * end;
    bool get(void * dst, size_t n) {
        if ((size_t) (end - p) < n) return false;
        memcpy(dst, p, n);
        p += n;
        return true;
    }
    const uint8_t * take(size_t n) {
        if ((size_t) (end - p) < n) return nullptr;
        const uint8_t * r = p;
        p += n;
        return r;
    }
};

bool all_finite_f16(const uint8_t * p, size_t n) {
    for (size_t j = 0; j < n; ++j) {
        uint16_t h;
        memcpy(&h, p + j * sizeof(h), sizeof(h));
        if ((h & 0x7c00) == 0x7c00) return false; // Inf or NaN
    }
    return true;
}

bool all_finite(const uint8_t * p, size_t n_floats) {
    for (size_t j = 0; j < n_floats; ++j) {
        float f;
        memcpy(&f, p + j * sizeof(float), sizeof(f));
        if (!std::isfinite(f)) return false;
    }
    return true;
}

// One slot of a blob, parsed and validated (pointers into the blob).
struct slot_view {
    uint32_t        deco_fitted = 0;
    const uint8_t * mats = nullptr;
    uint32_t        n_head = 0, d = 0;
    const uint8_t * head_fitted = nullptr;
    const uint8_t * U = nullptr;
};
} // namespace

size_t pkv_side_state_size(const pkv_side_state * s) {
    if (!s) {
        return 0;
    }
    size_t n = sizeof(pkv_side_header);
    for (const auto & sl : s->slots) {
        n += slot_bytes(s, (uint32_t) sl.n_head, (uint32_t) sl.d);
    }
    return n;
}

void pkv_side_state_get(const pkv_side_state * s, uint8_t * dst) {
    if (!s) {
        return;
    }
    const pkv_side_header h = { PKV_SIDE_MAGIC, PKV_SIDE_VERSION, (uint32_t) s->slots.size(),
                                (uint32_t) s->g, (uint32_t) s->variant, (uint32_t) s->hadamard,
                                (uint32_t) s->squat_rank, (uint32_t) s->squat_normalize,
                                (uint32_t) s->squat_on_deco, s->squat_lambda };
    auto put = [&dst](const void * src, size_t n) { memcpy(dst, src, n); dst += n; };
    put(&h, sizeof(h));
    for (const auto & sl : s->slots) {
        const uint32_t fitted = sl.fitted ? 1u : 0u;
        put(&fitted, sizeof(fitted));
        put(sl.mats.data(), sl.mats.size() * sizeof(float));
        const uint32_t dims[2] = { (uint32_t) sl.n_head, (uint32_t) sl.d };
        put(dims, sizeof(dims));
        memset(dst, 0, pad4(sl.head_fitted.size()));
        memcpy(dst, sl.head_fitted.data(), sl.head_fitted.size());
        dst += pad4(sl.head_fitted.size());
        memset(dst, 0, u_bytes((uint32_t) sl.n_head, (uint32_t) sl.d));
        memcpy(dst, sl.U.data(), sl.U.size() * sizeof(uint16_t));
        dst += u_bytes((uint32_t) sl.n_head, (uint32_t) sl.d);
    }
}

const char * pkv_side_state_set(pkv_side_state * s, const uint8_t * src, size_t n, bool replace) {
    if (!s) {
        return n == 0 ? nullptr : "pyllm-kv: the state carries side state (DecoQuant/SQuat) but this context's cache types have none";
    }
    reader rd = { src, src + n };
    pkv_side_header h;
    if (!rd.get(&h, sizeof(h)) || h.magic != PKV_SIDE_MAGIC) {
        return "pyllm-kv: side state in the state is corrupt (bad magic or too short)";
    }
    if (h.version != PKV_SIDE_VERSION) {
        return "pyllm-kv: side state in the state has another version (saved by another pyllm-kv)";
    }
    if (h.n_slots != s->slots.size() || (int) h.g != s->g || (int) h.variant != s->variant ||
        (h.hadamard != 0) != s->hadamard) {
        return "pyllm-kv: DecoQuant side state in the state was made with other settings "
               "(layers, PYLLM_KV_DECO_GROUP/VARIANT/HADAMARD)";
    }
    if ((int) h.squat_rank != s->squat_rank || (h.squat_normalize != 0) != s->squat_normalize ||
        (h.squat_on_deco != 0) != s->squat_on_deco || !(h.squat_lambda == s->squat_lambda)) {
        return "pyllm-kv: SQuat side state in the state was made with other settings "
               "(PYLLM_KV_SQUAT_RANK/LAMBDA/NORMALIZE/TRANSFORM)";
    }
    const size_t nm = (size_t) PKV_SIDE_NMATS * s->g * s->g;

    // parse and validate everything first: on error the live state stays as it was
    std::vector<slot_view> views(s->slots.size());
    for (size_t i = 0; i < s->slots.size(); ++i) {
        const pkv_side_slot & cur = s->slots[i];
        slot_view & v = views[i];
        uint32_t dims[2];
        if (!rd.get(&v.deco_fitted, sizeof(v.deco_fitted)) || !(v.mats = rd.take(nm * sizeof(float))) ||
            !rd.get(dims, sizeof(dims))) {
            return "pyllm-kv: side state in the state is truncated";
        }
        v.n_head = dims[0];
        v.d      = dims[1];
        if (v.deco_fitted > 1) {
            return "pyllm-kv: DecoQuant side state in the state is corrupt (bad slot flag)";
        }
        if (!all_finite(v.mats, nm)) {
            return "pyllm-kv: DecoQuant side state in the state is corrupt (non-finite matrix)";
        }
        if (!cur.squat() && (v.n_head || v.d)) {
            return "pyllm-kv: the state carries SQuat side state but this context's K cache type is not squat";
        }
        if ((v.n_head == 0) != (v.d == 0) || v.n_head > 4096 || v.d > PKV_LINALG_MAX_N ||
            (cur.n_head && v.n_head && (v.n_head != (uint32_t) cur.n_head || v.d != (uint32_t) cur.d))) {
            return "pyllm-kv: SQuat side state in the state is for another head layout (different model?)";
        }
        const size_t nu = (size_t) v.n_head * pkv_squat_packed_len((int) v.d);
        if (!(v.head_fitted = rd.take(pad4(v.n_head))) || !(v.U = rd.take(u_bytes(v.n_head, v.d)))) {
            return "pyllm-kv: side state in the state is truncated";
        }
        for (uint32_t hd = 0; hd < v.n_head; ++hd) {
            if (v.head_fitted[hd] > 1) {
                return "pyllm-kv: SQuat side state in the state is corrupt (bad head flag)";
            }
        }
        if (!all_finite_f16(v.U, nu)) {
            return "pyllm-kv: SQuat side state in the state is corrupt (non-finite matrix)";
        }
        if (!replace) {
            if (v.deco_fitted && cur.fitted && memcmp(cur.mats.data(), v.mats, nm * sizeof(float)) != 0) {
                return "pyllm-kv: this sequence's saved DecoQuant side state differs from the one the context "
                       "already uses; restore it into a context without other sequences";
            }
            const size_t pl = pkv_squat_packed_len((int) v.d);
            for (uint32_t hd = 0; cur.n_head && hd < v.n_head; ++hd) {
                if (v.head_fitted[hd] && cur.head_fitted[hd] &&
                    memcmp(cur.U.data() + hd * pl, v.U + hd * pl * sizeof(uint16_t), pl * sizeof(uint16_t)) != 0) {
                    return "pyllm-kv: this sequence's saved SQuat side state differs from the one the context "
                           "already uses; restore it into a context without other sequences";
                }
            }
        }
    }
    if (rd.p != rd.end) {
        return "pyllm-kv: side state in the state has trailing bytes (corrupt)";
    }

    for (size_t i = 0; i < s->slots.size(); ++i) {
        pkv_side_slot & cur = s->slots[i];
        const slot_view & v = views[i];
        if (replace || (v.deco_fitted && !cur.fitted)) {
            memcpy(cur.mats.data(), v.mats, nm * sizeof(float));
            cur.fitted = v.deco_fitted != 0;
        }
        if (!cur.squat()) {
            continue;
        }
        if (v.n_head && cur.n_head == 0) {   // a fresh context: adopt the layout
            cur.n_head = (int) v.n_head;
            cur.d      = (int) v.d;
            squat_set_identity(cur);
        }
        if (replace && v.n_head == 0) {
            squat_set_identity(cur);
        }
        const size_t pl = pkv_squat_packed_len((int) v.d);
        for (uint32_t hd = 0; hd < v.n_head; ++hd) {
            if (replace || (v.head_fitted[hd] && !cur.head_fitted[hd])) {
                memcpy(cur.U.data() + hd * pl, v.U + hd * pl * sizeof(uint16_t), pl * sizeof(uint16_t));
                cur.head_fitted[hd] = v.head_fitted[hd];
            }
        }
    }
    return nullptr;
}
