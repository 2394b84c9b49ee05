//! The AMX tile operations both tile kernels share ([`super::bf16`]: `tdpbf16ps`, [`super::quant`]:
//! `tdpbusd`): one configuration (eight 16-row × 64-byte tiles), a 32 × 32 output block held in
//! the accumulator tiles tmm0-3, fed by two A tiles (tmm4-5) and two B tiles (tmm6-7) per step.
//! Written with `asm!` because Rust's AMX intrinsics are unstable; the tile registers are not
//! visible to the compiler, so no code but these functions touches them.

use std::arch::asm;

/// The 64-byte AMX tile configuration (palette 1): rows and bytes per row of each of the 8 tiles.
#[repr(C, align(64))]
pub struct TileConfig {
    palette: u8,
    start_row: u8,
    _reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// `(rows, bytes per row)` of tiles 0..8.
    pub fn new(tiles: [(u8, u16); 8]) -> Self {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            _reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for (t, (r, b)) in tiles.into_iter().enumerate() {
            c.rows[t] = r;
            c.colsb[t] = b;
        }
        c
    }

    /// `ldtilecfg`.
    ///
    /// # Safety
    /// The CPU has AMX and the process holds the tile data permission ([`super::cpu::amx_status`]).
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn load(&self) {
        debug_assert!(super::cpu::amx_status().is_ok());
        // SAFETY (caller): AMX is usable; the configuration is a valid palette-1 layout.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) self as *const Self, options(nostack, readonly))
        };
    }
}

/// Zero the four accumulator tiles.
///
/// # Safety
/// A tile configuration is loaded ([`TileConfig::load`]).
#[inline(always)]
pub unsafe fn zero_acc() {
    // SAFETY (caller): tiles are configured.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3"
        )
    };
}

/// Store the 32 × 32 block of 4-byte accumulators at `dst`, rows `stride` bytes apart (tmm0 top
/// left, tmm1 top right, tmm2 and tmm3 below).
///
/// # Safety
/// Tiles are configured, and `dst` has 32 writable rows of 128 bytes, `stride` bytes apart.
#[inline(always)]
pub unsafe fn store_acc(dst: *mut u8, stride: usize) {
    // SAFETY (caller): every row written lies inside the block described above.
    unsafe {
        asm!(
            "tilestored [{d} + {s}*1], tmm0",
            "tilestored [{d1} + {s}*1], tmm1",
            "tilestored [{d2} + {s}*1], tmm2",
            "tilestored [{d3} + {s}*1], tmm3",
            d = in(reg) dst, d1 = in(reg) dst.add(64),
            d2 = in(reg) dst.add(16 * stride), d3 = in(reg) dst.add(16 * stride + 64),
            s = in(reg) stride,
            options(nostack),
        )
    };
}

/// One step of a 32 × 32 block with dot-product instruction `$op`: `tmm0..3 += A · B` for the A
/// rows at `a0` (top 16) and `a1` (bottom 16), `a_stride` bytes apart, and the B tiles at `b0`
/// (left 16 columns) and `b1` (right), `b_stride` bytes apart.
macro_rules! dot_step {
    ($(#[$m:meta])* $name:ident, $op:literal) => {
        $(#[$m])*
        ///
        /// # Safety
        /// Tiles are configured, and each pointer has 16 readable rows of 64 bytes at its stride.
        #[inline(always)]
        pub unsafe fn $name(
            a0: *const u8,
            a1: *const u8,
            a_stride: usize,
            b0: *const u8,
            b1: *const u8,
            b_stride: usize,
        ) {
            // SAFETY (caller): every tile load reads inside the rows described above.
            unsafe {
                asm!(
                    "tileloadd tmm4, [{a0} + {as}*1]",
                    "tileloadd tmm6, [{b0} + {bs}*1]",
                    concat!($op, " tmm0, tmm4, tmm6"),
                    "tileloadd tmm7, [{b1} + {bs}*1]",
                    concat!($op, " tmm1, tmm4, tmm7"),
                    "tileloadd tmm5, [{a1} + {as}*1]",
                    concat!($op, " tmm2, tmm5, tmm6"),
                    concat!($op, " tmm3, tmm5, tmm7"),
                    a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                    as = in(reg) a_stride, bs = in(reg) b_stride,
                    options(nostack, readonly),
                )
            };
        }
    };
}

dot_step!(
    /// bf16 pairs into f32 (`tdpbf16ps`).
    step_bf16,
    "tdpbf16ps"
);
dot_step!(
    /// u8 · i8 quads into i32 (`tdpbusd`).
    step_u8i8,
    "tdpbusd"
);

/// Return the tiles to their initial state (cheaper context switches).
///
/// # Safety
/// The CPU has AMX and the process holds the tile permission.
#[inline(always)]
pub unsafe fn release() {
    // SAFETY (caller): AMX is usable.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}
