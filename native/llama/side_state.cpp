// pyllm-kv side state inside llama.cpp's KV cache (see pkv/llama_side_state.h).
// Compiled into libllama; the numerics are pkv_deco_fit() in libpyllm_kv_native.

#include "pkv/llama_side_state.h"
#include "pkv/ggml_hooks.h"
#include "pkv/sidestate.h"

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
constexpr uint32_t PKV_SIDE_VERSION = 1;
constexpr int      PKV_SIDE_NMATS   = 3;          // QUERY, ENCODE, DECODE

// One layer's K (or V) matrices, in ggml's mul_mat orientation: y = R x for a
// group x of g values, R row-major g x g. With the row-vector convention of
// pkv_deco_fit (x = u S, u = x S^-1):
//   QUERY  R = S        (q S^T)
//   ENCODE R = S^-1^T   (x S^-1)
//   DECODE R = S^T      (u S)
struct pkv_side_slot {
    pkv_side_state   * owner  = nullptr;
    bool               active = false; // this layer's K (or V) is a deco type
    bool               fitted = false;
    std::vector<float> mats;           // PKV_SIDE_NMATS * g * g
};

std::string env_str(const char * name, const char * def) {
    const char * v = std::getenv(name);
    return (v && *v) ? std::string(v) : std::string(def);
}

bool env_hadamard() {
    const std::string v = env_str("PYLLM_KV_DECO_HADAMARD", "0");
    if (v == "0") return false;
    if (v == "1") return true;
    throw std::runtime_error("pyllm-kv: PYLLM_KV_DECO_HADAMARD must be 0 or 1, got '" + v + "'");
}

} // namespace

struct pkv_side_state {
    ggml_type type_k, type_v;
    int  n_layer  = 0;
    int  g        = 16;
    int  variant  = PKV_DECO_WHITEN;
    bool hadamard = false;
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
    const bool deco_k = PKV_GGML_IS_DECO(type_k);
    const bool deco_v = PKV_GGML_IS_DECO(type_v);
    if (!deco_k && !deco_v) {
        return nullptr;
    }

    auto s = new pkv_side_state();
    try {
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
            s->slots[2 * il + 0].active = deco_k;
            s->slots[2 * il + 1].active = deco_v;
        }
        for (auto & sl : s->slots) {
            sl.owner = s;
            s->set_identity(sl);
        }

        char buf[256];
        snprintf(buf, sizeof(buf), "DecoQuant side state: K %s, V %s, group %d, variant %s, Hadamard %s, %d layers",
                 deco_k ? "on" : "off", deco_v ? "on" : "off", s->g,
                 s->variant == PKV_DECO_WHITEN ? "whiten" : "rotate", s->hadamard ? "kept" : "replaced", n_layer);
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
    if (!PKV_GGML_IS_DECO(type)) {
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

pkv_side_slot * slot_of(pkv_side_state * s, int il, bool is_v) {
    if (!s || il < 0 || il >= s->n_layer) {
        return nullptr;
    }
    pkv_side_slot * sl = &s->slots[(size_t) 2 * il + (is_v ? 1 : 0)];
    return sl->active ? sl : nullptr;
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

ggml_tensor * pkv_side_kshift_undo(ggml_context * ctx, pkv_side_state * s, int il, ggml_tensor * k_f32) {
    pkv_side_slot * sk = slot_of(s, il, false);
    return sk ? apply(ctx, k_f32, make_op(ctx, s, sk, nullptr), PKV_SIDE_DECODE) : k_f32;
}

ggml_tensor * pkv_side_kshift_redo(ggml_context * ctx, pkv_side_state * s, int il, ggml_tensor * k_f32) {
    pkv_side_slot * sk = slot_of(s, il, false);
    return sk ? apply(ctx, k_f32, make_op(ctx, s, sk, nullptr), PKV_SIDE_ENCODE) : k_f32;
}

// ---- session state ----------------------------------------------------------------

namespace {
struct pkv_side_header {
    uint32_t magic, version, n_slots, g, variant, hadamard;
};
}

size_t pkv_side_state_size(const pkv_side_state * s) {
    if (!s) {
        return 0;
    }
    const size_t per_slot = sizeof(uint32_t) + (size_t) PKV_SIDE_NMATS * s->g * s->g * sizeof(float);
    return sizeof(pkv_side_header) + s->slots.size() * per_slot;
}

void pkv_side_state_get(const pkv_side_state * s, uint8_t * dst) {
    if (!s) {
        return;
    }
    const pkv_side_header h = { PKV_SIDE_MAGIC, PKV_SIDE_VERSION, (uint32_t) s->slots.size(),
                                (uint32_t) s->g, (uint32_t) s->variant, (uint32_t) s->hadamard };
    memcpy(dst, &h, sizeof(h));
    dst += sizeof(h);
    for (const auto & sl : s->slots) {
        const uint32_t fitted = sl.fitted ? 1u : 0u;
        memcpy(dst, &fitted, sizeof(fitted));
        dst += sizeof(fitted);
        memcpy(dst, sl.mats.data(), sl.mats.size() * sizeof(float));
        dst += sl.mats.size() * sizeof(float);
    }
}

const char * pkv_side_state_set(pkv_side_state * s, const uint8_t * src, size_t n, bool replace) {
    if (!s) {
        return n == 0 ? nullptr : "pyllm-kv: the state carries DecoQuant side state but this context's cache types have none";
    }
    if (n != pkv_side_state_size(s)) {
        return "pyllm-kv: DecoQuant side state in the state has the wrong size (different model, cache type or settings)";
    }
    pkv_side_header h;
    memcpy(&h, src, sizeof(h));
    if (h.magic != PKV_SIDE_MAGIC || h.version != PKV_SIDE_VERSION) {
        return "pyllm-kv: DecoQuant side state in the state is corrupt (bad magic or version)";
    }
    if (h.n_slots != s->slots.size() || (int) h.g != s->g || (int) h.variant != s->variant ||
        (h.hadamard != 0) != s->hadamard) {
        return "pyllm-kv: DecoQuant side state in the state was made with other settings "
               "(layers, PYLLM_KV_DECO_GROUP/VARIANT/HADAMARD)";
    }
    const size_t nm = (size_t) PKV_SIDE_NMATS * s->g * s->g;
    const uint8_t * body = src + sizeof(h);
    const size_t per_slot = sizeof(uint32_t) + nm * sizeof(float);

    // validate everything first: on error the live state stays as it was
    for (size_t i = 0; i < s->slots.size(); ++i) {
        const uint8_t * p = body + i * per_slot;
        uint32_t fitted;
        memcpy(&fitted, p, sizeof(fitted));
        if (fitted > 1) {
            return "pyllm-kv: DecoQuant side state in the state is corrupt (bad slot flag)";
        }
        const float * m = reinterpret_cast<const float *>(p + sizeof(fitted));
        for (size_t j = 0; j < nm; ++j) {
            float f;
            memcpy(&f, m + j, sizeof(f));
            if (!std::isfinite(f)) {
                return "pyllm-kv: DecoQuant side state in the state is corrupt (non-finite matrix)";
            }
        }
        const pkv_side_slot & cur = s->slots[i];
        if (!replace && fitted && cur.fitted && memcmp(cur.mats.data(), m, nm * sizeof(float)) != 0) {
            return "pyllm-kv: this sequence's saved DecoQuant side state differs from the one the context "
                   "already uses; restore it into a context without other sequences";
        }
    }
    for (size_t i = 0; i < s->slots.size(); ++i) {
        const uint8_t * p = body + i * per_slot;
        uint32_t fitted;
        memcpy(&fitted, p, sizeof(fitted));
        pkv_side_slot & cur = s->slots[i];
        if (replace || (fitted && !cur.fitted)) {
            memcpy(cur.mats.data(), p + sizeof(fitted), nm * sizeof(float));
            cur.fitted = fitted != 0;
        }
    }
    return nullptr;
}
