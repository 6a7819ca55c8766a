"""Restoration transforms: geometry and value invariants, reference statistics, determinism."""

import functools
import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cpu_env

from transvw_jax import transforms as T
from transvw_jax.transforms import cube_ops as C
from transvw_jax.transforms import intensity, painting, policies, shuffle
from transvw_jax.transforms import reference_numpy as R
from transvw_jax.transforms.elastic import _field_factors, _sample, elastic_at, elastic_displacement
from transvw_jax.transforms.flip import flip_axes

SMALL = (16, 16, 8)
SHUFFLE_SHAPE = (40, 40, 20)  # blocks up to 4x4x2


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def batched(fn, n, x, seed=0):
    """fn(key, x) for n keys, jitted and vmapped over the keys."""
    return np.asarray(jax.jit(jax.vmap(fn, in_axes=(0, None)))(keys(n, seed), jnp.asarray(x)))


def distinct_cube(shape, seed=0):
    """Values in (0, 1), all different, so moved voxels can be traced."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n).reshape(shape).astype(np.float32) + 1) / (n + 2)


def bounding_box(mask):
    idx = np.argwhere(mask)
    return idx.min(0), idx.max(0) + 1


def assert_uniform_ints(values, lo, hi, tol=0.05):
    """Every integer in [lo, hi] appears with frequency 1/(hi-lo+1) within tol."""
    values = np.asarray(values).ravel()
    assert values.min() >= lo and values.max() <= hi
    freq = np.bincount(values - lo, minlength=hi - lo + 1) / values.size
    np.testing.assert_allclose(freq, 1.0 / (hi - lo + 1), atol=tol)


# --------------------------------------------------------------------------- non-linear
def test_nonlinear_is_monotone_and_fixes_the_end_points():
    ramp = np.linspace(0, 1, np.prod(SMALL), dtype=np.float32).reshape(SMALL)
    out = batched(T.nonlinear, 400, ramp).reshape(400, -1)
    inverted = np.asarray(jax.vmap(lambda k: intensity.nonlinear_curve(k)[1])(keys(400)))
    diffs = np.diff(out, axis=1)
    assert np.all(diffs[~inverted] >= -1e-7) and np.all(diffs[inverted] <= 1e-7)
    np.testing.assert_array_equal(out[:, 0], inverted.astype(np.float32))
    np.testing.assert_array_equal(out[:, -1], 1 - inverted.astype(np.float32))
    assert out.min() >= 0 and out.max() <= 1


def test_nonlinear_inverts_about_half_the_time():
    inverted = np.asarray(jax.vmap(lambda k: intensity.nonlinear_curve(k)[1])(keys(4000, seed=1)))
    assert abs(inverted.mean() - 0.5) < 0.03


def test_nonlinear_matches_the_bezier_curve():
    """A voxel value x maps to the y of the curve point whose x is x (reference interp)."""
    key = jax.random.key(5)
    table, inverted = intensity.nonlinear_curve(key)
    p = np.asarray(jax.random.uniform(jax.random.split(key)[0], (2, 2)), np.float64)
    grid = np.random.default_rng(0).random(1000)
    expected = R.nonlinear_with(grid, p, bool(inverted))
    got = np.asarray(intensity.apply_table(table, jnp.asarray(grid, jnp.float32)))
    np.testing.assert_allclose(got, expected, atol=2e-3)


# --------------------------------------------------------------------------- local shuffle
@pytest.mark.parametrize("seed", range(4))
def test_single_block_shuffle_permutes_inside_one_small_block(seed):
    x = distinct_cube(SHUFFLE_SHAPE, seed)
    out = np.asarray(jax.jit(T.local_shuffle, static_argnums=2)(jax.random.key(seed), x, 1))
    np.testing.assert_array_equal(np.sort(out.ravel()), np.sort(x.ravel()))
    changed = out != x
    if changed.any():
        lo, hi = bounding_box(changed)
        assert np.all(hi - lo <= np.array(SHUFFLE_SHAPE) // 10)
        region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        np.testing.assert_array_equal(np.sort(out[region].ravel()), np.sort(x[region].ravel()))


def test_block_permutations_are_uniform_permutations_of_each_block():
    volume = jnp.array([3, 108, 1, 50])
    perms = np.asarray(jax.jit(jax.vmap(lambda k: shuffle._block_permutations(k, volume, 108)))(keys(6000)))
    for b, n in enumerate(np.asarray(volume)):
        block = np.broadcast_to(np.arange(n), (6000, n))
        np.testing.assert_array_equal(np.sort(perms[:, b, :n], axis=1), block)
        rest = np.broadcast_to(np.arange(n, 108), (6000, 108 - n))
        np.testing.assert_array_equal(perms[:, b, n:], rest)
    orders = perms[:, 0, 0] * 9 + perms[:, 0, 1] * 3 + perms[:, 0, 2]  # the 6 orders of 3 slots
    freq = np.unique(orders, return_counts=True)[1] / 6000
    assert freq.size == 6 and np.abs(freq - 1 / 6).max() < 0.02
    where_first = np.argmax(perms[:, 1, :] == 0, axis=1)  # slot 0 lands anywhere in the block
    assert_uniform_ints(where_first // 12, 0, 8, tol=0.02)


def test_shuffle_changes_nothing_outside_its_blocks():
    x = distinct_cube(SHUFFLE_SHAPE, 1)
    for key in keys(6, seed=2):
        out = np.asarray(T.local_shuffle(key, jnp.asarray(x), 5))
        origin, size = map(np.asarray, shuffle.shuffle_blocks(jax.random.split(key)[0], SHUFFLE_SHAPE, 5))
        union = np.zeros(SHUFFLE_SHAPE, bool)
        for o, s in zip(origin, size, strict=True):
            union[o[0]:o[0] + s[0], o[1]:o[1] + s[1], o[2]:o[2] + s[2]] = True
        np.testing.assert_array_equal(out[~union], x[~union])
        assert set(out[union].tolist()) <= set(x[union].tolist())


def test_shuffle_block_sizes_and_positions_follow_the_reference():
    origin, size = jax.vmap(lambda k: shuffle.shuffle_blocks(k, SHUFFLE_SHAPE, 5))(keys(2000))
    origin, size = np.asarray(origin).reshape(-1, 3), np.asarray(size).reshape(-1, 3)
    for axis, n in enumerate(SHUFFLE_SHAPE):
        assert_uniform_ints(size[:, axis], 1, n // 10, tol=0.02)
        assert np.all(origin[:, axis] >= 0) and np.all(origin[:, axis] + size[:, axis] <= n)


def reference_shuffle_sources(shape, num_blocks, rng):
    """Each voxel's source under the original procedure (numpy, block by block)."""
    return R.local_shuffle(rng, np.arange(np.prod(shape)).reshape(shape), num_blocks)


def displacement_stats(sources, shape):
    src = np.stack(np.unravel_index(sources.astype(np.int64), shape), -1)
    own = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    d = np.abs(src - own).reshape(-1, 3)
    return (d.sum(1) > 0).mean(), d.mean(0)


@pytest.mark.slow
def test_many_block_shuffle_moves_voxels_as_far_as_the_reference():
    """10,000 blocks on 64x64x32: the fraction of voxels that move and the mean distance
    per axis agree with the reference procedure."""
    shape = (64, 64, 32)
    rng = np.random.default_rng(0)
    ref = [displacement_stats(reference_shuffle_sources(shape, 10_000, rng), shape) for _ in range(4)]
    index = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    # One tiling per axis per cube: per-cube spread is wide (~10% in distance), so average 24.
    ours = batched(functools.partial(T.local_shuffle, num_blocks=10_000), 24, index, seed=3)
    got = [displacement_stats(o, shape) for o in ours]
    ref_moved, ref_dist = np.mean([r[0] for r in ref]), np.mean([r[1] for r in ref], 0)
    got_moved, got_dist = np.mean([g[0] for g in got]), np.mean([g[1] for g in got], 0)
    assert abs(got_moved - ref_moved) < 0.012, (got_moved, ref_moved)
    np.testing.assert_allclose(got_dist, ref_dist, rtol=0.08)
    for o in ours:  # a permutation of the cube: nothing duplicated, nothing lost
        np.testing.assert_array_equal(np.sort(o.ravel()), np.arange(o.size))


@pytest.mark.slow
def test_many_block_shuffle_share_moved_varies_across_cubes_like_the_reference():
    """The share of voxels moved, cube to cube, at 64x64x32: the block-by-block procedure
    (a sum over 10,000 independent blocks) has a standard deviation of ~0.0037 over cubes;
    the tiling must match it, not only the mean (a product grid with independent per-tile
    draws had ~0.0091). 48 reference cubes and 256 of ours: the ratio of the two sample
    standard deviations has a sampling error of ~11%, so [0.75, 1.6] is ~3 errors either
    side of the measured ratio (~1.1) and excludes the former ~2.5 by ~4 errors."""
    shape = (64, 64, 32)
    own = np.arange(np.prod(shape)).reshape(shape)
    rng = np.random.default_rng(5)
    ref = np.array([(reference_shuffle_sources(shape, 10_000, rng) != own).mean() for _ in range(48)])
    index = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    ours = batched(functools.partial(T.local_shuffle, num_blocks=10_000), 256, index, seed=11)
    got = (ours != own).reshape(len(ours), -1).mean(1)
    assert abs(got.mean() - ref.mean()) < 0.003, (got.mean(), ref.mean())
    ratio = got.std(ddof=1) / ref.std(ddof=1)
    assert 0.75 < ratio < 1.6, (got.std(ddof=1), ref.std(ddof=1))


# --------------------------------------------------------------------------- painting
def test_in_paint_block_geometry_and_noise():
    n = 300
    x = np.full(SMALL, 0.5, np.float32)
    out = batched(functools.partial(T.in_paint, max_blocks=1), n, x)
    sizes = []
    for o in out:
        changed = o != 0.5
        lo, hi = bounding_box(changed)
        assert changed[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].all()  # one solid block
        assert changed.sum() == np.prod(hi - lo)
        assert np.all(lo >= 3) and np.all(np.array(SMALL) - hi >= 3)
        sizes.append(hi - lo)
    sizes = np.array(sizes)
    for axis, m in enumerate(SMALL):
        assert_uniform_ints(sizes[:, axis], m // 6, m // 3, tol=0.1)
    noise = out[out != 0.5]
    assert 0 <= noise.min() and noise.max() < 1 and abs(noise.mean() - 0.5) < 0.02


def test_genesis_in_paint_draws_up_to_five_blocks():
    present = jax.vmap(lambda k: painting.in_paint_blocks(k, SMALL, 5)[2])(keys(4000))
    counts = np.asarray(present).sum(1)
    assert counts.min() >= 1 and counts.max() <= 5
    expected = sum(0.95**k for k in range(5))  # first always, each further with p 0.95
    assert abs(counts.mean() - expected) < 0.05


def test_out_paint_keeps_one_block_and_fills_the_rest_with_noise():
    x = distinct_cube(SMALL)
    out = batched(functools.partial(T.out_paint, max_extra_blocks=0), 200, x)
    sizes = []
    for o in out:
        kept = o == x
        lo, hi = bounding_box(kept)
        assert kept[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].all() and kept.sum() == np.prod(hi - lo)
        sizes.append(hi - lo)
        assert 0 <= o.min() and o.max() < 1
    sizes = np.array(sizes)
    for axis, m in enumerate(SMALL):
        assert_uniform_ints(m - sizes[:, axis], 3 * m // 7, 4 * m // 7, tol=0.12)


def test_out_paint_extra_blocks_are_kept_exactly():
    x = distinct_cube(SMALL)
    for key in keys(10, seed=4):
        out = np.asarray(T.out_paint(key, jnp.asarray(x), 4))
        origin, size, present = map(np.asarray, painting.out_paint_blocks(key, SMALL, 4))
        keep = np.zeros(SMALL, bool)
        for o, s, p in zip(origin, size, present, strict=True):
            if p:
                keep[o[0]:o[0] + s[0], o[1]:o[1] + s[1], o[2]:o[2] + s[2]] = True
        np.testing.assert_array_equal(out[keep], x[keep])
        assert np.all(out[~keep] != x[~keep])


# --------------------------------------------------------------------------- flip
def test_flips_are_the_same_on_input_and_target():
    x, y = distinct_cube(SMALL, 1), distinct_cube(SMALL, 2)
    flipped_any = 0
    for key in keys(60, seed=5):
        fx, fy = (np.asarray(a) for a in T.flip(key, jnp.asarray(x), jnp.asarray(y), 0.4))
        matches = [axes for r in range(4) for axes in itertools.combinations(range(3), r)
                   if np.array_equal(np.flip(x, axes) if axes else x, fx)]
        assert len(matches) == 1
        axes = matches[0]
        np.testing.assert_array_equal(np.flip(y, axes) if axes else y, fy)
        flipped_any += bool(axes)
    assert flipped_any > 0


def test_flip_happens_with_the_configured_probability():
    happened = np.asarray(jax.vmap(lambda k: flip_axes(k, 0.4)[1])(keys(4000)))
    assert abs(happened.mean() - 0.4) < 0.03


# --------------------------------------------------------------------------- elastic
# Both implementations (the suite runs on 8 simulated devices, where "auto" is xla).
ELASTIC_IMPLS = pytest.mark.parametrize("impl", ["xla", "native"])


@ELASTIC_IMPLS
def test_elastic_with_zero_alpha_is_the_identity(impl):
    x = distinct_cube(SMALL)
    out = T.elastic(jax.random.key(0), jnp.asarray(x), alpha=0.0, impl=impl)
    np.testing.assert_array_equal(np.asarray(out), x)


@ELASTIC_IMPLS
def test_elastic_moves_voxels_only_in_x_and_y(impl):
    fn = functools.partial(T.elastic, impl=impl)
    z_only = np.broadcast_to(np.linspace(0, 1, SMALL[2], dtype=np.float32), SMALL).copy()
    out = batched(fn, 8, z_only)
    np.testing.assert_allclose(out, np.broadcast_to(z_only, out.shape), atol=1e-6)
    x_ramp = np.broadcast_to(np.linspace(0, 1, SMALL[0], dtype=np.float32)[:, None, None], SMALL).copy()
    assert np.abs(batched(fn, 8, x_ramp) - x_ramp).max() > 0.05


@pytest.mark.parametrize("shape,alpha,sigma", [
    (SMALL, 991.0, 8.0),
    ((9, 13, 7), 300.0, 2.0),     # odd sizes, Z below one vector chunk
    ((5, 4, 20), 991.0, 4.0),     # Z not a multiple of the 16- (or 8-) voxel chunk
    ((8, 8, 8), 1000.0, 2.0),     # displacements up to ~9 cube widths: the exact reflection path
])
@pytest.mark.slow
def test_native_elastic_equals_the_pure_jax_one(shape, alpha, sigma):
    """The CPU kernel and the XLA formulation are the same function (to float32 rounding),
    batched under vmap and on a single cube, with the same key."""
    x = jnp.asarray(np.random.default_rng(2).random((6, *shape), dtype=np.float32))
    ks = keys(6, seed=4)
    run = {impl: jax.jit(jax.vmap(functools.partial(T.elastic, alpha=alpha, sigma=sigma, impl=impl)))
           for impl in ("xla", "native")}
    want = np.asarray(run["xla"](ks, x))
    np.testing.assert_allclose(np.asarray(run["native"](ks, x)), want, atol=2e-5)
    single = jax.jit(functools.partial(T.elastic, alpha=alpha, sigma=sigma, impl="native"))(ks[1], x[1])
    np.testing.assert_allclose(np.asarray(single), want[1], atol=2e-5)


def test_native_elastic_keeps_the_dtype():
    x = jnp.asarray(np.random.default_rng(0).random(SMALL), jnp.bfloat16)
    out = T.elastic(jax.random.key(1), x, impl="native")
    want = T.elastic(jax.random.key(1), x, impl="xla")
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32)).max()) <= 2**-7


@pytest.mark.slow
def test_transvw_policy_is_the_same_with_either_elastic_impl():
    x = jnp.asarray(np.random.default_rng(5).random((8, 20, 20, 10), dtype=np.float32))
    outs = {}
    for impl in ("xla", "native"):
        cfg = T.default_config("transvw")
        cfg.elastic.impl = impl
        outs[impl] = jax.jit(lambda k, x, cfg=cfg: T.batch_policy(k, x, cfg))(keys(8, seed=6), x)
    (a_inp, a_target, a_id), (b_inp, b_target, b_id) = outs["xla"], outs["native"]
    np.testing.assert_array_equal(np.asarray(a_id), np.asarray(b_id))
    np.testing.assert_array_equal(np.asarray(a_target), np.asarray(b_target))
    np.testing.assert_allclose(np.asarray(b_inp), np.asarray(a_inp), atol=2e-5)


def test_auto_elastic_impl_is_xla_on_several_devices_native_on_one():
    assert jax.device_count() > 1 and T.resolve_elastic_impl("auto", (64, 64, 32)) == "xla"
    code = ("from transvw_jax import transforms as T; s = (64, 64, 32); "
            "print(T.resolve_elastic_impl('auto', s), T.resolve_elastic_impl('xla', s))")
    env = cpu_env()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["native", "xla"]


def test_elastic_impl_config_errors_name_the_key(monkeypatch):
    from transvw_jax import native

    cfg = T.default_config("transvw")
    cfg.elastic.impl = "cuda"
    with pytest.raises(ValueError, match=r"transforms\.elastic\.impl: 'cuda' is not one of auto, xla"):
        T.validate_config(cfg)
    cfg.elastic.impl = "native"
    T.validate_config(cfg)  # pure: whether it can run is decided with the platform
    with pytest.raises(ValueError, match="smoothing ranks <= 64"):
        T.resolve_elastic_impl("native", (8, 8, 300), sigma=1.0)
    monkeypatch.setattr(native, "elastic_unavailable_reason", lambda: "no C++ compiler (g++) on PATH")
    with pytest.raises(ValueError, match=r"transforms\.elastic\.impl: 'native' cannot run here: no C\+\+"):
        T.resolve_elastic_impl("native", (8, 8, 8))
    assert T.resolve_elastic_impl("auto", (8, 8, 8)) == "xla"  # auto falls back instead


def test_native_elastic_build_is_cached_and_names_a_missing_compiler(tmp_path, monkeypatch):
    from transvw_jax import native

    first = native.build_elastic(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build_elastic(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler \\(no-such-compiler\\)"):
        native.build_elastic(tmp_path / "other")


def test_native_elastic_rejects_mismatched_operands():
    from transvw_jax import native

    native.load_elastic()
    core, bx, by, bz = _field_factors(jax.random.key(0), SMALL, 991.0, 8.0)
    call = jax.ffi.ffi_call(native.ELASTIC_TARGET, jax.ShapeDtypeStruct(SMALL, jnp.float32))
    with pytest.raises(Exception, match="elastic: bases must be"):
        jax.block_until_ready(call(jnp.zeros(SMALL), core, by[:-1], by, bz))


def test_elastic_sampling_matches_scipy_map_coordinates_with_reflect():
    """Linear interpolation with reflected edges, as the reference's map_coordinates(order=1,
    mode='reflect'), including coordinates far outside the cube (several periods)."""
    shape = (12, 10, 4)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    rng = np.random.default_rng(1)
    cx = rng.uniform(-30, 42, shape).astype(np.float32)
    cy = rng.uniform(-25, 35, shape).astype(np.float32)
    cx[0, 0, :] = [-1.0, 11.0, 11.5, -0.5]  # exactly on and between the edge taps
    iz = np.broadcast_to(np.arange(shape[2]), shape)
    got = np.asarray(jax.jit(_sample)(jnp.asarray(x), jnp.asarray(cx), jnp.asarray(cy), jnp.asarray(iz)))
    expected = R.sample(x.astype(np.float64), cx, cy, iz)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_elastic_displacement_has_the_reference_spread():
    shape = (64, 64, 32)
    fields = jax.jit(jax.vmap(lambda k: jnp.stack(elastic_displacement(k, shape))))(keys(600))
    std = np.asarray(fields).std(axis=(0, 1))
    expected = R.elastic_field_std(shape, 991.0, 8.0)
    for v in [(32, 32, 16), (0, 0, 0), (63, 10, 31), (5, 40, 2)]:
        assert abs(std[v] / expected[v] - 1) < 0.08, (v, std[v], expected[v])


# --------------------------------------------------------------------------- policies
@functools.cache
def default_batch_policy(policy, batch_chunk=-1):
    """The default `policy` over a batch (optionally another `batch_chunk`), jitted once for
    the tests that share it: compiling a policy is ~10 s of a 2-core CPU, running it on a
    few small cubes a fraction of one."""
    cfg = T.default_config(policy)
    cfg.batch_chunk = batch_chunk
    return jax.jit(lambda k, x: T.batch_policy(k, x, cfg))


def policy_ids(cfg, n=2000, shape=SMALL):
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    fn = jax.jit(jax.vmap(lambda k, x: T.apply_policy(k, x, cfg), in_axes=(0, None)))
    inp, target, ids = fn(keys(n, seed=9), jnp.asarray(x))
    return np.asarray(inp), np.asarray(target), np.asarray(ids), x


@pytest.mark.slow
def test_transvw_applies_exactly_one_transform_each_a_quarter_of_the_time():
    inp, target, ids, x = policy_ids(T.default_config("transvw"))
    freq = np.bincount(ids, minlength=4) / ids.size
    np.testing.assert_allclose(freq, 0.25, atol=0.035)
    np.testing.assert_array_equal(target, np.broadcast_to(x, target.shape))  # target: original
    assert inp.min() >= 0 and inp.max() <= 1


@pytest.mark.slow
def test_transvw_choice_weights_switch_transforms_off():
    cfg = T.default_config("transvw")
    cfg.choice_weights = (0.0, 1.0, 0.0, 0.0)
    cfg.elastic.enabled = False
    inp, _, ids, x = policy_ids(cfg, n=50)
    assert np.all(ids == T.NONLINEAR)
    for i in inp:  # a monotone intensity map keeps the order of the voxels
        order = np.argsort(x.ravel())
        d = np.diff(i.ravel()[order])
        assert np.all(d >= -1e-7) or np.all(d <= 1e-7)


@pytest.mark.slow
def test_genesis_composition_frequencies():
    inp, target, bits, _ = policy_ids(T.default_config("genesis"))
    applied = {name: ((bits >> t) & 1).mean() for t, name in enumerate(T.TRANSFORM_NAMES)}
    expected = {"flip": 0.4, "local_shuffle": 0.5, "nonlinear": 0.9, "in_paint": 0.9 * 0.2,
                "out_paint": 0.9 * 0.8}
    for name, p in expected.items():
        assert abs(applied[name] - p) < 0.035, (name, applied[name], p)
    painted = ((bits >> T.IN_PAINT) & 1) + ((bits >> T.OUT_PAINT) & 1)
    assert painted.max() == 1  # never both
    assert inp.min() >= 0 and inp.max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["transvw", "genesis"])
def test_same_key_same_output_and_batch_members_differ(policy):
    x = jnp.asarray(np.random.default_rng(1).random((4, *SMALL), dtype=np.float32))
    k = keys(4, seed=11)
    run = default_batch_policy(policy)
    a, b = run(k, x), run(k, x)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    same_cube = jnp.broadcast_to(x[0], x.shape)
    out = np.asarray(run(k, same_cube)[0])
    assert all(not np.array_equal(out[i], out[j]) for i in range(4) for j in range(i))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("policy", ["transvw", "genesis"])
def test_policies_preserve_dtype_and_range(policy, dtype):
    # Batch 4, as test_same_key_same_output_and_batch_members_differ: float32 reuses its program.
    # bfloat16 is the low-precision type the models compute in; float16 takes the same code.
    x = jnp.asarray(np.random.default_rng(2).random((4, *SMALL)), dtype)
    inp, target, _ = default_batch_policy(policy)(keys(4), x)
    assert inp.dtype == dtype and target.dtype == dtype
    assert float(inp.min()) >= 0 and float(inp.max()) <= 1


@pytest.mark.slow
def test_transvw_equals_the_chosen_transform():
    """The fused policy gives what the chosen single transform gives with its sub-key."""
    cfg = T.default_config("transvw")
    x = jnp.asarray(distinct_cube(SHUFFLE_SHAPE, 3))
    policy = jax.jit(lambda k, x: policies.transvw(k, x, cfg))
    # Each single transform jitted once (op by op, 24 cubes took ~20 s of a 2-core CPU).
    single = [jax.jit(f) for f in (functools.partial(T.local_shuffle, num_blocks=5), T.nonlinear,
                                   functools.partial(T.in_paint, max_blocks=1),
                                   functools.partial(T.out_paint, max_extra_blocks=0))]
    elastic = jax.jit(T.elastic)
    seen = set()
    for key in keys(24, seed=12):
        inp, target, choice = policy(key, x)
        k_elastic, _, k_t = jax.random.split(key, 3)
        expected = single[int(choice)](k_t, elastic(k_elastic, x))
        np.testing.assert_allclose(np.asarray(inp), np.asarray(expected), atol=1e-5)  # fused float ops
        np.testing.assert_array_equal(np.asarray(target), np.asarray(x))
        seen.add(int(choice))
    assert seen == {0, 1, 2, 3}


@pytest.mark.slow
@pytest.mark.parametrize("num_blocks", [10_000, 3])
def test_genesis_equals_the_composition_of_single_transforms(num_blocks):
    cfg = T.default_config("genesis")
    cfg.local_shuffle.num_blocks = num_blocks
    x = jnp.asarray(distinct_cube(SHUFFLE_SHAPE, 4))
    policy = jax.jit(lambda k, x: policies.genesis(k, x, cfg))
    # Each single transform jitted once (op by op, 16 cubes took up to ~30 s of a 2-core CPU).
    flip = jax.jit(lambda k, e, t: T.flip(k, e, t, cfg.flip.prob, cfg.flip.max_flips))
    local_shuffle = jax.jit(lambda k, e: T.local_shuffle(k, e, num_blocks))
    nonlinear = jax.jit(T.nonlinear)
    in_paint = jax.jit(lambda k, e: T.in_paint(k, e, 5))
    out_paint = jax.jit(lambda k, e: T.out_paint(k, e, 4))
    for key in keys(16, seed=13):
        inp, target, bits = policy(key, x)
        k_flip, k_shuffle, k_nonlinear, k_paint, k_dice = jax.random.split(key, 5)
        u = np.asarray(jax.random.uniform(k_dice, (4,)))
        e, t = flip(k_flip, x, x)
        if u[0] < 0.5:
            e = local_shuffle(k_shuffle, e)
        if u[1] < 0.9:
            e = nonlinear(k_nonlinear, e)
        if u[2] < 0.9:
            e = in_paint(k_paint, e) if u[3] < 0.2 else out_paint(k_paint, e)
        np.testing.assert_allclose(np.asarray(inp), np.asarray(e), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(target), np.asarray(t))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("choice_weights", (0.0, 0.0, 0.0, 0.0), "transforms.choice_weights"),
        ("local_shuffle.num_blocks", -1, "transforms.local_shuffle.num_blocks"),
        ("paint.inpaint_prob", 2.0, "transforms.paint.inpaint_prob"),
        ("policy", "mixup", "transforms.policy"),
    ],
)
def test_validate_config_names_the_bad_value(field, value, match):
    cfg = T.default_config("genesis")
    T.validate_config(cfg)
    section, _, name = field.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
    with pytest.raises(ValueError, match=match):
        T.validate_config(cfg)


def test_unknown_policy_is_named():
    cfg = T.default_config()
    cfg.policy = "mixup"
    with pytest.raises(ValueError, match="transforms.policy: unknown policy 'mixup'"):
        T.apply_policy(jax.random.key(0), jnp.zeros(SMALL), cfg)


def test_noise_is_uniform_and_uncorrelated():
    noise = np.asarray(painting.noise(jax.random.key(3), jnp.zeros((64, 64, 32))))
    assert 0 <= noise.min() and noise.max() < 1
    hist = np.histogram(noise, bins=10, range=(0, 1))[0] / noise.size
    np.testing.assert_allclose(hist, 0.1, atol=0.004)
    for axis in range(3):
        a, b = np.moveaxis(noise, axis, 0)[:-1].ravel(), np.moveaxis(noise, axis, 0)[1:].ravel()
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.01
    other = np.asarray(painting.noise(jax.random.key(4), jnp.zeros((64, 64, 32))))
    assert abs(np.corrcoef(noise.ravel(), other.ravel())[0, 1]) < 0.01


def test_elastic_at_points_equals_the_deformed_cube():
    x = jnp.asarray(distinct_cube(SHUFFLE_SHAPE, 5))
    key = jax.random.key(8)
    idx = jnp.asarray(np.random.default_rng(0).integers(0, x.size, 300))
    full = np.asarray(T.elastic(key, x)).reshape(-1)[np.asarray(idx)]
    np.testing.assert_allclose(np.asarray(elastic_at(key, x, idx)), full, atol=1e-5)


# --------------------------------------------------------------------------- batching
@pytest.mark.slow
@pytest.mark.parametrize("policy, chunk, shards", [("transvw", 2, 1), ("genesis", 3, 2)])
def test_chunked_batch_equals_one_vmap(policy, chunk, shards):
    """Chunks (per shard) through a loop give the same outputs as one vmap over the batch;
    a chunk that does not divide the per-shard batch falls back to the largest divisor
    (genesis: 3 on 2 shards of 4 cubes -> 2 loops of 2 per shard). The chunking wraps
    whichever policy runs per cube: each case takes one policy, so that both policies and
    both chunk/shard cases run without compiling every pair."""
    x = jnp.asarray(np.random.default_rng(3).random((8, *SMALL), dtype=np.float32))
    chunked = T.default_config(policy)
    chunked.batch_chunk = chunk
    expected = default_batch_policy(policy, batch_chunk=0)(keys(8, seed=21), x)  # one vmap
    got = jax.jit(lambda k, x: T.batch_policy(k, x, chunked, shards=shards))(keys(8, seed=21), x)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), atol=1e-5)


def test_batch_chunk_resolves_per_backend():
    cfg = T.default_config()
    assert cfg.batch_chunk == -1
    assert T.resolve_batch_chunk(cfg, "cpu") == T.CPU_BATCH_CHUNK["transvw"]
    assert T.resolve_batch_chunk(T.default_config("genesis"), "cpu") == T.CPU_BATCH_CHUNK["genesis"]
    assert T.resolve_batch_chunk(cfg, "gpu") == 0 and T.resolve_batch_chunk(cfg, "tpu") == 0
    cfg.batch_chunk = 4
    assert T.resolve_batch_chunk(cfg, "gpu") == T.resolve_batch_chunk(cfg, "cpu") == 4
    cfg.batch_chunk = -2
    with pytest.raises(ValueError, match="transforms.batch_chunk"):
        T.validate_config(cfg)


@pytest.mark.slow
def test_genesis_target_is_the_policy_target():
    cfg = T.default_config("genesis")
    x = jnp.asarray(distinct_cube(SMALL, 6))
    target = jax.jit(lambda k, x: policies.genesis_target(k, x, cfg))  # once, not op by op
    policy = jax.jit(lambda k, x: policies.genesis(k, x, cfg)[1])
    for key in keys(12, seed=14):
        np.testing.assert_array_equal(np.asarray(target(key, x)), np.asarray(policy(key, x)))


def test_computed_once_returns_the_function_value():
    x = jnp.arange(12.0).reshape(3, 4)
    got = jax.jit(lambda k, x: C.computed_once(k, lambda: (x * 2 + 1, x.sum())))(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(x * 2 + 1))
    assert float(got[1]) == 66.0
