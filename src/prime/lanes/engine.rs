//! The lane algorithm, written once over the lane primitives of [`super::scalar`] and
//! [`super::ifma`] and expanded into each by `lane_engine!`. Included textually by `mod.rs`.
//!
//! Every function below runs the same instruction sequence for every lane and every value:
//! loop bounds come from the const sizes `N` and `L` and the public `max_s`, table entries are
//! selected by masks after reading all of them, reductions are masked selects, and the only
//! per-lane outputs are the masks handed back to the caller.

/// Expands the engine over the primitives in scope (`V`, `zero`, `splat`, `from_lanes`,
/// `to_lanes`, `add`, `sub`, `and`, `or`, `xor`, `shr52`, `shr63`, `madd_lo`, `madd_hi`,
/// `opaque`). The attributes (the target features for IFMA, none for the scalar lanes) go on
/// every function, so the whole engine is compiled for the instruction set of its primitives.
macro_rules! lane_engine {
    ($(#[$attr:meta])*) => {
        use super::{Limbs, Params, LANES, MASK52, WINDOW};

        /// Lane-wise mask: all ones where `x == 0`.
        $(#[$attr])*
        #[inline]
        fn is_zero(x: V) -> V {
            // (x | −x) has its top bit set exactly when x ≠ 0.
            opaque(sub(shr63(or(x, sub(zero(), x))), splat(1)))
        }

        /// `a` where `mask` is all ones, `b` where it is zero.
        $(#[$attr])*
        #[inline]
        fn select(mask: V, a: V, b: V) -> V {
            xor(b, and(mask, xor(a, b)))
        }

        $(#[$attr])*
        #[inline]
        fn load<const L: usize>(x: &Limbs<L>) -> [V; L] {
            let mut out = [zero(); L];
            for j in 0..L {
                out[j] = from_lanes(&x[j]);
            }
            out
        }

        $(#[$attr])*
        #[inline]
        fn store<const L: usize>(x: &[V; L]) -> Limbs<L> {
            let mut out = [[0u64; LANES]; L];
            for j in 0..L {
                out[j] = to_lanes(x[j]);
            }
            out
        }

        /// Overwrites secret temporaries; `black_box` keeps the stores.
        $(#[$attr])*
        #[inline]
        fn wipe<const L: usize>(x: &mut [V; L]) {
            for v in x.iter_mut() {
                *v = zero();
            }
            core::hint::black_box(x);
        }

        /// Carry-propagates 64-bit limb sums into 52-bit limbs. The sum fits in `52·L` bits
        /// wherever it is used (callers' bounds), so the last carry is zero.
        $(#[$attr])*
        #[inline]
        fn normalize<const L: usize>(acc: &mut [V; L]) {
            let mask = splat(MASK52);
            let mut carry = zero();
            for j in 0..L {
                let t = add(acc[j], carry);
                acc[j] = and(t, mask);
                carry = shr52(t);
            }
        }

        /// Almost-Montgomery multiplication `a·b·R⁻¹ (mod m)` with `R = 2^(52L)`, in every lane.
        /// Operand scanning: one row `a·b[i]` and one reduction row `u·m` per limb of `b`, low
        /// halves of the 104-bit products into column `j`, high halves into column `j + 1`,
        /// carries kept in the 64-bit lanes and propagated once at the end. With `16m ≤ R`
        /// (guaranteed by the limb count) inputs below `4m` give an output below `2m`: values
        /// stay in `[0, 2m)` and no conditional subtraction is needed until the very end.
        $(#[$attr])*
        #[inline]
        fn amm<const L: usize>(a: &[V; L], b: &[V; L], m: &[V; L], k0: V) -> [V; L] {
            let mut acc = [zero(); L];
            for i in 0..L {
                let bi = b[i];
                for j in 0..L {
                    acc[j] = madd_lo(acc[j], a[j], bi);
                }
                // u = acc[0]·k0 mod 2^52 (madd_lo keeps the low 52 bits of the product).
                let u = madd_lo(zero(), acc[0], k0);
                for j in 0..L {
                    acc[j] = madd_lo(acc[j], m[j], u);
                }
                // acc[0] ≡ 0 (mod 2^52) now: shift down one limb, high halves landing there.
                let carry = shr52(acc[0]);
                for j in 0..L - 1 {
                    acc[j] = madd_hi(madd_hi(acc[j + 1], a[j], bi), m[j], u);
                }
                acc[L - 1] = madd_hi(madd_hi(zero(), a[L - 1], bi), m[L - 1], u);
                acc[0] = add(acc[0], carry);
            }
            normalize(&mut acc);
            acc
        }

        /// `x mod m` for `x < 2m`: one masked subtraction.
        $(#[$attr])*
        #[inline]
        fn reduce<const L: usize>(x: &[V; L], m: &[V; L]) -> [V; L] {
            let mask = splat(MASK52);
            let mut d = [zero(); L];
            let mut borrow = zero();
            for j in 0..L {
                let t = sub(sub(x[j], m[j]), borrow);
                d[j] = and(t, mask);
                borrow = shr63(t);
            }
            // borrow = 1: x < m, keep x.
            let keep = sub(zero(), borrow);
            let mut out = [zero(); L];
            for j in 0..L {
                out[j] = select(keep, x[j], d[j]);
            }
            out
        }

        /// Lane mask: `a == b` (both fully reduced).
        $(#[$attr])*
        #[inline]
        fn eq<const L: usize>(a: &[V; L], b: &[V; L]) -> V {
            let mut diff = zero();
            for j in 0..L {
                diff = or(diff, xor(a[j], b[j]));
            }
            is_zero(diff)
        }

        /// The per-lane `width`-bit digits of the exponents at bit `low` (public positions).
        $(#[$attr])*
        #[inline]
        fn digit<const N: usize>(exp: &[[u64; LANES]; N], low: usize, width: usize) -> V {
            let limb = low / 64;
            let off = low % 64;
            let mut d = [0u64; LANES];
            for (lane, dl) in d.iter_mut().enumerate() {
                let mut v = exp[limb][lane] >> off;
                if off + width > 64 && limb + 1 < N {
                    v |= exp[limb + 1][lane] << (64 - off);
                }
                *dl = v & ((1u64 << width) - 1);
            }
            let out = from_lanes(&d);
            core::hint::black_box(&mut d);
            out
        }

        /// Context loaded into vectors.
        struct Ctx<const L: usize> {
            m: [V; L],
            k0: V,
            one: [V; L],
            r2: [V; L],
        }

        $(#[$attr])*
        #[inline]
        fn ctx<const L: usize>(p: &Params<L>) -> Ctx<L> {
            Ctx {
                m: load(&p.m),
                k0: from_lanes(&p.k0),
                one: load(&p.one),
                r2: load(&p.r2),
            }
        }

        /// `base^exp` in Montgomery form for `base < 2m` in Montgomery form, every lane with
        /// its own exponent. All 64·N bits are processed in fixed windows of [`WINDOW`] bits;
        /// each digit selects its table entry by a masked scan of the whole table.
        $(#[$attr])*
        fn pow_mont<const N: usize, const L: usize>(
            c: &Ctx<L>,
            base: &[V; L],
            exp: &[[u64; LANES]; N],
        ) -> [V; L] {
            const TABLE: usize = 1 << WINDOW;
            let mut table = [[zero(); L]; TABLE];
            table[0] = c.one;
            table[1] = *base;
            for i in 2..TABLE {
                table[i] = if i % 2 == 0 {
                    amm(&table[i / 2], &table[i / 2], &c.m, c.k0)
                } else {
                    amm(&table[i - 1], base, &c.m, c.k0)
                };
            }
            let bits = 64 * N;
            let windows = bits / WINDOW;
            let mut acc = [zero(); L];
            let mut entry = [zero(); L];
            for w in (0..windows).rev() {
                let d = digit(exp, w * WINDOW, WINDOW);
                for e in entry.iter_mut() {
                    *e = zero();
                }
                for (i, t) in table.iter().enumerate() {
                    let mask = is_zero(xor(d, splat(i as u64)));
                    for j in 0..L {
                        entry[j] = or(entry[j], and(t[j], mask));
                    }
                }
                if w == windows - 1 {
                    acc = entry;
                } else {
                    for _ in 0..WINDOW {
                        acc = amm(&acc, &acc, &c.m, c.k0);
                    }
                    acc = amm(&acc, &entry, &c.m, c.k0);
                }
            }
            for t in table.iter_mut() {
                wipe(t);
            }
            wipe(&mut entry);
            acc
        }

        /// `2^exp` in Montgomery form: a squaring per exponent bit, then a masked doubling
        /// (`x + (x & mask)`, no reduction: `x < 2m` doubles to below `4m`, which the next
        /// squaring accepts, see [`amm`]). The last doubling is reduced by the caller.
        $(#[$attr])*
        fn pow2_mont<const N: usize, const L: usize>(
            c: &Ctx<L>,
            exp: &[[u64; LANES]; N],
        ) -> [V; L] {
            let mut acc = c.one;
            for limb in (0..N).rev() {
                for bit in (0..64).rev() {
                    acc = amm(&acc, &acc, &c.m, c.k0);
                    let mask = sub(zero(), digit(exp, 64 * limb + bit, 1));
                    for j in 0..L {
                        acc[j] = add(acc[j], and(acc[j], mask));
                    }
                    normalize(&mut acc);
                }
            }
            // acc < 4m: a multiplication by R (the Montgomery one) brings it below 2m.
            let out = amm(&acc, &c.one, &c.m, c.k0);
            wipe(&mut acc);
            out
        }

        /// `a·b·R⁻¹ mod m` for `a, b < m`, fully reduced.
        $(#[$attr])*
        pub(crate) fn mul<const L: usize>(p: &Params<L>, a: &Limbs<L>, b: &Limbs<L>) -> Limbs<L> {
            let c = ctx(p);
            let r = amm(&load(a), &load(b), &c.m, c.k0);
            store(&reduce(&r, &c.m))
        }

        /// Out of Montgomery form, fully reduced.
        $(#[$attr])*
        #[inline]
        fn from_mont<const L: usize>(c: &Ctx<L>, x: &[V; L]) -> [V; L] {
            let mut unit = [zero(); L];
            unit[0] = splat(1);
            reduce(&amm(x, &unit, &c.m, c.k0), &c.m)
        }

        /// `base^exp mod m` per lane, ordinary form in and out (`base < m`).
        $(#[$attr])*
        pub(crate) fn pow<const N: usize, const L: usize>(
            p: &Params<L>,
            base: &Limbs<L>,
            exp: &[[u64; LANES]; N],
        ) -> Limbs<L> {
            let c = ctx(p);
            let b = amm(&load(base), &c.r2, &c.m, c.k0);
            let r = pow_mont(&c, &b, exp);
            store(&from_mont(&c, &r))
        }

        /// `2^exp mod m` per lane, ordinary form.
        $(#[$attr])*
        pub(crate) fn pow2<const N: usize, const L: usize>(
            p: &Params<L>,
            exp: &[[u64; LANES]; N],
        ) -> Limbs<L> {
            let c = ctx(p);
            let r = pow2_mont(&c, exp);
            store(&from_mont(&c, &r))
        }

        /// One Miller-Rabin round per lane: `n − 1 = d·2^s`, base 2 when `base` is `None`, else
        /// the lane's base (ordinary form, `< n`); `first` receives every lane's `base^d mod n`.
        /// Returns a mask per lane, all ones = pass:
        /// `y = base^d = ±1`, or `y^(2^j) = −1` for some `1 ≤ j < s`, looking at `j < max_s`
        /// only. The chain of squarings has the public length `max_s − 1` in every lane.
        $(#[$attr])*
        pub(crate) fn miller_rabin<const N: usize, const L: usize>(
            p: &Params<L>,
            base: Option<&Limbs<L>>,
            d: &[[u64; LANES]; N],
            s: &[u64; LANES],
            max_s: u64,
            first: Option<&mut Limbs<L>>,
        ) -> [u64; LANES] {
            let c = ctx(p);
            let mut y = match base {
                Some(b) => {
                    let mut bm = amm(&load(b), &c.r2, &c.m, c.k0);
                    let y = pow_mont(&c, &bm, d);
                    wipe(&mut bm);
                    y
                }
                None => pow2_mont(&c, d),
            };
            // `base^d mod m` of every lane (ordinary form), for a caller that put an
            // exponentiation of its own in a lane (the key's pair-wise test).
            if let Some(out) = first {
                let mut y0 = from_mont(&c, &y);
                *out = store(&y0);
                wipe(&mut y0);
            }
            let one = reduce(&c.one, &c.m);
            let mut minus_one = [zero(); L];
            {
                // m − one, limb by limb with borrows (one < m).
                let mask = splat(MASK52);
                let mut borrow = zero();
                for j in 0..L {
                    let t = sub(sub(c.m[j], one[j]), borrow);
                    minus_one[j] = and(t, mask);
                    borrow = shr63(t);
                }
            }
            let s = from_lanes(s);
            let mut yr = reduce(&y, &c.m);
            let mut pass = or(eq(&yr, &one), eq(&yr, &minus_one));
            for j in 1..max_s {
                y = amm(&y, &y, &c.m, c.k0);
                yr = reduce(&y, &c.m);
                // j < s, for s, j < 2^63.
                let j_lt_s = sub(zero(), shr63(sub(splat(j), s)));
                pass = or(pass, and(eq(&yr, &minus_one), j_lt_s));
            }
            wipe(&mut y);
            wipe(&mut yr);
            to_lanes(pass)
        }
    };
}
