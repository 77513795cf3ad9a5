// Centering side state (docs/quality.md, "centering"): per layer, for K (or V),
// a center row mu of the first ubatch (per KV head and channel the median, in the domain
// the rows are stored in: after upstream's Hadamard rotation or the deco
// transform). Rows are stored as x - mu, so a constant offset (K biases: the
// Qwen2 family puts large ones into a few channels) no longer stretches every
// block's range.
//   K: nothing to undo at read time. q.(k - mu) = q.k - q.mu, and q.mu is the
//      same for every key of a query, which softmax ignores.
//   V: the attention weights of a query sum to 1, so sum_i p_i (v_i - mu) + mu
//      is the exact output: mu is added back once per query head.

#include "side_method.h"

#include "ggml-backend.h"
#include "pkv/ggml_fit_op.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace pkv {
namespace {

class center_slot final : public slot {
public:
    center_slot(const side_settings & st, const layer_shape & sh)
        : st(st), sh(sh), mu((size_t) (sh.head_dim * sh.n_head_kv), 0.0f) {}

    void add_tensors(ggml_context * ctx) override {
        dev = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, sh.head_dim, sh.n_head_kv);
        ggml_format_name(dev, "pkv_center_%s_l%d", sh.is_v ? "v" : "k", sh.il);
    }

    bool fitted() const override { return is_fitted; }

    void reset() override {
        is_fitted = false;
        host_stale = false;
        std::fill(mu.begin(), mu.end(), 0.0f);
    }

    void attn_in_k(ggml_context * ctx, ggml_tensor ** q, ggml_tensor ** k) override {
        (void) q; // softmax-invariant: queries stay as they are
        *k = subtract(ctx, *k);
    }

    // K folded into the store (side_method.h): the row is handed over, not subtracted
    ggml_tensor * defer_key_center(ggml_context * ctx, ggml_tensor ** k) override {
        *k = as_f32_contiguous(ctx, *k);
        return center_of(ctx, *k);
    }

    void attn_in_v(ggml_context * ctx, ggml_tensor ** v) override {
        *v = subtract(ctx, *v);
        graph_mu = mu_graph;
    }

    // cur: [head_dim * n_head, n_tokens] (build_attn_mha's output); query head h
    // reads KV head h / n_gqa, so query heads come in groups of n_gqa per KV head.
    ggml_tensor * attn_out(ggml_context * ctx, ggml_tensor * cur) override {
        ggml_tensor * m = graph_mu;
        graph_mu = nullptr;
        const int64_t per_kv = sh.head_dim * sh.n_head_kv; // V values of one token, all KV heads
        if (!m || cur->ne[0] % per_kv != 0) {
            throw std::runtime_error("pyllm-kv: centering: the attention output of layer " + std::to_string(sh.il) +
                                     " does not match its V side state");
        }
        const int64_t n_gqa = cur->ne[0] / per_kv;
        const int64_t n_tok = ggml_nelements(cur) / cur->ne[0];
        ggml_tensor * x = ggml_is_contiguous(cur) ? cur : ggml_cont(ctx, cur);
        x = ggml_reshape_4d(ctx, x, sh.head_dim, n_gqa, sh.n_head_kv, n_tok);
        x = ggml_add(ctx, x, ggml_reshape_4d(ctx, m, sh.head_dim, 1, sh.n_head_kv, 1));
        return ggml_reshape(ctx, x, cur);
    }

    ggml_tensor * kshift_undo(ggml_context * ctx, ggml_tensor * x) override {
        return is_fitted ? ggml_add(ctx, x, as_rows(ctx, dev, x)) : x;
    }

    ggml_tensor * kshift_redo(ggml_context * ctx, ggml_tensor * x) override {
        return is_fitted ? ggml_sub(ctx, x, as_rows(ctx, dev, x)) : x;
    }

    // state: u32 fitted, float mu[head_dim * n_head_kv]
    size_t state_size() const override { return sizeof(uint32_t) + mu.size() * sizeof(float); }

    void state_write(blob_writer & w) const override {
        sync_host();
        const uint32_t f = is_fitted ? 1u : 0u;
        w.put(&f, sizeof(f));
        w.put(mu.data(), mu.size() * sizeof(float));
    }

    const char * state_read(blob_reader & r, bool replace, bool commit) override {
        sync_host();
        uint32_t f = 0;
        const uint8_t * m = nullptr;
        if (!r.get(&f, sizeof(f)) || !(m = r.take(mu.size() * sizeof(float)))) {
            return "pyllm-kv: side state in the state is truncated";
        }
        if (f > 1) {
            return "pyllm-kv: centering side state in the state is corrupt (bad slot flag)";
        }
        for (size_t j = 0; j < mu.size(); ++j) {
            float x;
            memcpy(&x, m + j * sizeof(float), sizeof(x));
            if (!std::isfinite(x)) {
                return "pyllm-kv: centering side state in the state is corrupt (non-finite mean)";
            }
        }
        if (!replace && f && is_fitted && memcmp(mu.data(), m, mu.size() * sizeof(float)) != 0) {
            return "pyllm-kv: this sequence's saved centering side state differs from the one the context "
                   "already uses; restore it into a context without other sequences";
        }
        if (commit && (replace || (f && !is_fitted))) {
            memcpy(mu.data(), m, mu.size() * sizeof(float));
            is_fitted = f != 0;
            if (is_fitted) {
                upload(dev, mu.data(), mu.size() * sizeof(float));
            }
        }
        return nullptr;
    }

private:
    const side_settings & st;
    const layer_shape sh;
    bool is_fitted = false;
    mutable bool host_stale = false;  // fitted on a GPU (fit_op's PKV_FIT_ON_DEVICE): mu is in dev only
    std::atomic<int> fit_done{0};      // threads done with this fit (the last one marks it fitted)
    mutable std::vector<float> mu;    // host copy [n_head_kv][head_dim]
    ggml_tensor * dev = nullptr;      // the same in the cache's buffer [head_dim, n_head_kv]
    ggml_tensor * mu_graph = nullptr; // this graph's mean (fit output or dev)
    ggml_tensor * graph_mu = nullptr; // V: attn_in_v -> attn_out

    // the host copy from the cache's tensor, after a fit on a GPU
    void sync_host() const {
        if (host_stale) {
            download(dev, mu.data(), mu.size() * sizeof(float));
        }
        host_stale = false;
    }

    // mu viewed with x's rows: [head_dim, n_head_kv, 1, 1] against x [head_dim, n_head_kv, tokens]
    ggml_tensor * as_rows(ggml_context * ctx, ggml_tensor * m, const ggml_tensor * x) const {
        if (x->ne[0] == sh.head_dim) {
            return ggml_reshape_4d(ctx, m, sh.head_dim, sh.n_head_kv, 1, 1);
        }
        return ggml_reshape_4d(ctx, m, sh.head_dim * sh.n_head_kv, 1, 1, 1); // rows of all heads
    }

    // x [head_dim, n_head_kv, tokens] (f32 contiguous after this): x - mu, fitting
    // mu from x first if the slot is not fitted yet.
    ggml_tensor * subtract(ggml_context * ctx, ggml_tensor * x) {
        x = as_f32_contiguous(ctx, x);
        return ggml_sub(ctx, x, as_rows(ctx, center_of(ctx, x), x));
    }

    // this graph's center row [head_dim, n_head_kv] for rows x (f32 contiguous):
    // the fitted one, or the fit from x
    ggml_tensor * center_of(ggml_context * ctx, ggml_tensor * x) {
        if (x->ne[0] != sh.head_dim || x->ne[1] != sh.n_head_kv) {
            throw std::runtime_error("pyllm-kv: centering side state of layer " + std::to_string(sh.il) +
                                     " does not match the layer's rows");
        }
        if (is_fitted) {
            mu_graph = dev;
        } else {
            ggml_tensor * args[1] = { x };
            ggml_tensor * fit = ggml_custom_4d(ctx, GGML_TYPE_F32, sh.head_dim, sh.n_head_kv, 1, 1, args, 1,
                                               fit_op, GGML_N_TASKS_MAX, this);
            if (st.gpu_fit_center) {
                mark_device_fit(fit, PKV_FIT_CENTER);   // a GPU backend may compute it (native/cuda/pkv_fit.cu)
            }
            mu_graph = ggml_cpy(ctx, fit, dev);
        }
        return mu_graph;
    }

    // CPU, threads split the channels: per channel, the median over the
    // ubatch's rows. Not the mean: one huge row (the first token's "attention
    // sink" values) would drag the mean away from every other row and widen
    // their ranges instead of narrowing them. Each thread gathers its channels
    // row by row (contiguous reads), and the last thread to finish marks the
    // slot fitted.
    static void fit_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
        auto * self = static_cast<center_slot *>(userdata);
        if (ith == PKV_FIT_ON_DEVICE) {   // a GPU backend computed dst (the same medians): fitted, mu in dev
            if (!self->is_fitted) {
                self->is_fitted = true;
                self->host_stale = true;
                bump_epoch();
            }
            return;
        }
        const ggml_tensor * x = dst->src[0];
        const int64_t n = (int64_t) self->mu.size();
        if (!self->is_fitted) {
            GGML_ASSERT(x->type == GGML_TYPE_F32 && ggml_is_contiguous(x));
            const int64_t rows = ggml_nelements(x) / n;
            const int64_t j0 = n * ith / nth, j1 = n * (ith + 1) / nth;
            std::vector<float> cols((size_t) ((j1 - j0) * rows));
            std::vector<int64_t> cnt((size_t) (j1 - j0), 0);
            for (int64_t r = 0; r < rows; ++r) {
                const float * xr = (const float *) x->data + r * n;
                for (int64_t j = j0; j < j1; ++j) {
                    const float v = xr[j];
                    if (std::isfinite(v)) {
                        cols[(size_t) ((j - j0) * rows + cnt[(size_t) (j - j0)]++)] = v;
                    }
                }
            }
            for (int64_t j = j0; j < j1; ++j) {
                float * c = cols.data() + (j - j0) * rows;
                const int64_t k = cnt[(size_t) (j - j0)];
                float m = 0.0f;
                if (k > 0) {
                    const int64_t h = k / 2;
                    std::nth_element(c, c + h, c + k);
                    m = c[h];
                    if (k % 2 == 0) {
                        m = 0.5f * (m + *std::max_element(c, c + h));
                    }
                }
                self->mu[(size_t) j] = m == 0.0f ? 0.0f : m;   // -0 as +0 (so does the GPU fit)
            }
            if (self->fit_done.fetch_add(1, std::memory_order_acq_rel) + 1 == nth) {
                self->fit_done.store(0, std::memory_order_relaxed);
                self->is_fitted = true;
                bump_epoch();
            }
        }
        const int64_t j0 = n * ith / nth, j1 = n * (ith + 1) / nth;
        memcpy((float *) dst->data + j0, self->mu.data() + j0, (size_t) (j1 - j0) * sizeof(float));
    }
};

} // namespace

std::unique_ptr<slot> make_center_slot(const side_settings & st, const layer_shape & sh) {
    (void) st;
    if (sh.head_dim <= 0 || sh.n_head_kv <= 0) {
        throw std::runtime_error("pyllm-kv: centering needs the layer's head size and KV heads");
    }
    return std::unique_ptr<slot>(new center_slot(st, sh));
}

} // namespace pkv
