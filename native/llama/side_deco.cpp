// DecoQuant side state (deco4/deco3/deco2; docs/decoquant.md): per layer, for
// K (or V), a g x g transform S fitted from the first ubatch's own rows. Rows
// are stored as u = x S^-1 per group of g values; attention never rebuilds x:
// K: scores use q S^T; V: the attention output is multiplied by S.
// The numerics are pkv_deco_fit() (native/src/deco.c); this file is the glue.

#include "side_method.h"

#include "pkv/sidestate.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

namespace pkv {
namespace {

// The three matrices of a slot, in ggml's mul_mat orientation (y = R x for a
// group x of g values, R row-major g x g). With the row-vector convention of
// pkv_deco_fit (x = u S, u = x S^-1):
//   QUERY  R = S        (q S^T)
//   ENCODE R = S^-1^T   (x S^-1)
//   DECODE R = S^T      (u S; V output, K-shift)
enum which { QUERY = 0, ENCODE = 1, DECODE = 2, N_MATS = 3 };

class deco_slot final : public slot {
public:
    deco_slot(const side_settings & st, const layer_shape & sh) : st(st), sh(sh), g(st.deco_group) {
        set_identity();
    }

    void add_tensors(ggml_context * ctx) override {
        dev = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, g, g, N_MATS);
        ggml_format_name(dev, "pkv_deco_%s_l%d", sh.is_v ? "v" : "k", sh.il);
    }

    bool fitted() const override { return is_fitted; }

    void reset() override {
        is_fitted = false;
        set_identity();
    }

    void attn_in_k(ggml_context * ctx, ggml_tensor ** q, ggml_tensor ** k) override {
        *k = as_f32_contiguous(ctx, *k);
        ggml_tensor * m = mats_for_graph(ctx, *k);
        *q = apply_group_matrix(ctx, *q, view(ctx, m, QUERY));
        *k = apply_group_matrix(ctx, *k, view(ctx, m, ENCODE));
    }

    void attn_in_v(ggml_context * ctx, ggml_tensor ** v) override {
        *v = as_f32_contiguous(ctx, *v);
        graph_mats = mats_for_graph(ctx, *v);
        *v = apply_group_matrix(ctx, *v, view(ctx, graph_mats, ENCODE));
    }

    ggml_tensor * attn_out(ggml_context * ctx, ggml_tensor * cur) override {
        ggml_tensor * m = graph_mats;
        graph_mats = nullptr;
        if (!m) {
            throw std::runtime_error("pyllm-kv: DecoQuant V output transform without its input transform");
        }
        return apply_group_matrix(ctx, cur, view(ctx, m, DECODE));
    }

    ggml_tensor * kshift_undo(ggml_context * ctx, ggml_tensor * x) override {
        return is_fitted ? apply_group_matrix(ctx, x, view(ctx, dev, DECODE)) : x;
    }

    ggml_tensor * kshift_redo(ggml_context * ctx, ggml_tensor * x) override {
        return is_fitted ? apply_group_matrix(ctx, x, view(ctx, dev, ENCODE)) : x;
    }

    // state: u32 fitted, float mats[3 g g]
    size_t state_size() const override { return sizeof(uint32_t) + mats.size() * sizeof(float); }

    void state_write(blob_writer & w) const override {
        const uint32_t f = is_fitted ? 1u : 0u;
        w.put(&f, sizeof(f));
        w.put(mats.data(), mats.size() * sizeof(float));
    }

    const char * state_read(blob_reader & r, bool replace, bool commit) override {
        uint32_t f = 0;
        const uint8_t * m = nullptr;
        if (!r.get(&f, sizeof(f)) || !(m = r.take(mats.size() * sizeof(float)))) {
            return "pyllm-kv: side state in the state is truncated";
        }
        if (f > 1) {
            return "pyllm-kv: DecoQuant side state in the state is corrupt (bad slot flag)";
        }
        for (size_t j = 0; j < mats.size(); ++j) {
            float x;
            memcpy(&x, m + j * sizeof(float), sizeof(x));
            if (!std::isfinite(x)) {
                return "pyllm-kv: DecoQuant side state in the state is corrupt (non-finite matrix)";
            }
        }
        if (!replace && f && is_fitted && memcmp(mats.data(), m, mats.size() * sizeof(float)) != 0) {
            return "pyllm-kv: this sequence's saved DecoQuant side state differs from the one the context "
                   "already uses; restore it into a context without other sequences";
        }
        if (commit && (replace || (f && !is_fitted))) {
            memcpy(mats.data(), m, mats.size() * sizeof(float));
            is_fitted = f != 0;
            if (is_fitted) {
                upload(dev, mats.data(), mats.size() * sizeof(float));
            }
        }
        return nullptr;
    }

private:
    const side_settings & st;
    const layer_shape sh;
    const int g;
    bool is_fitted = false;
    std::vector<float> mats;            // host copy: N_MATS * g * g
    ggml_tensor * dev = nullptr;        // the same in the cache's buffer [g, g, N_MATS]
    ggml_tensor * graph_mats = nullptr; // V: this graph's matrices, attn_in_v -> attn_out

    void set_identity() {
        mats.assign((size_t) N_MATS * g * g, 0.0f);
        for (int m = 0; m < N_MATS; ++m) {
            for (int i = 0; i < g; ++i) {
                mats[(size_t) m * g * g + (size_t) i * g + i] = 1.0f;
            }
        }
    }

    ggml_tensor * view(ggml_context * ctx, ggml_tensor * m, which w) const {
        return ggml_view_2d(ctx, m, g, g, m->nb[1], (size_t) w * m->nb[2]);
    }

    // Fitted: the cache's own tensor. Not yet: the fit op on this ubatch's rows,
    // its result copied into the cache's tensor inside the graph (the copy's
    // result is what the graph uses, so the copy cannot be skipped).
    ggml_tensor * mats_for_graph(ggml_context * ctx, ggml_tensor * x) {
        if (is_fitted) {
            return dev;
        }
        ggml_tensor * args[1] = { x };
        ggml_tensor * fit = ggml_custom_4d(ctx, GGML_TYPE_F32, g, g, N_MATS, 1, args, 1, fit_op, 1, this);
        return ggml_cpy(ctx, fit, dev);
    }

    // CPU, one task (a g x g problem): fit S from every row of the ubatch (all
    // heads: one S per layer), unless a reused graph meets an already fitted slot.
    static void fit_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
        (void) nth;
        if (ith != 0) {
            return;
        }
        auto * self = static_cast<deco_slot *>(userdata);
        const int g = self->g;
        const ggml_tensor * x = dst->src[0];
        if (!self->is_fitted) {
            GGML_ASSERT(x->type == GGML_TYPE_F32 && ggml_is_contiguous(x));
            const int64_t row_len = x->ne[0] * x->ne[1]; // one token, all heads
            const int64_t n_rows  = ggml_nelements(x) / row_len;
            std::vector<float> S((size_t) g * g), Sinv((size_t) g * g);
            if (pkv_deco_fit((const float *) x->data, n_rows, row_len, row_len, g, self->st.deco_variant,
                             S.data(), Sinv.data()) == 0) {
                float * q   = self->mats.data();
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
            self->is_fitted = true;
            bump_epoch();
        }
        memcpy(dst->data, self->mats.data(), self->mats.size() * sizeof(float));
    }
};

} // namespace

std::unique_ptr<slot> make_deco_slot(const side_settings & st, const layer_shape & sh) {
    if (sh.head_dim <= 0 || sh.head_dim % st.deco_group != 0) {
        // groups must not straddle two heads: the same S serves every head
        throw std::runtime_error(std::string("pyllm-kv: cache type ") + ggml_type_name(sh.type) + " needs a " +
                                 (sh.is_v ? "V" : "K") + " head size that is a multiple of " +
                                 std::to_string(st.deco_group) + " (this model, layer " + std::to_string(sh.il) +
                                 ": " + std::to_string(sh.head_dim) + ")");
    }
    return std::unique_ptr<slot>(new deco_slot(st, sh));
}

} // namespace pkv
