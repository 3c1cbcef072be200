//! Just enough ELF reading for the image build: "is this executable static?"
//! (no `PT_INTERP` program header) and "what does this kernel module's
//! `.modinfo` section say?" (its `depends=` line).

/// What is wrong with an ELF file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// Not ELF at all.
    #[error("not an ELF file")]
    NotElf,
    /// 32-bit, big-endian or cut short.
    #[error("unsupported or truncated ELF file: {0}")]
    Unsupported(&'static str),
}

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;

/// What [`inspect_executable`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecInfo {
    /// No program interpreter: needs no dynamic loader nor shared libraries.
    pub is_static: bool,
    /// The interpreter path, for a dynamic executable.
    pub interpreter: Option<String>,
    /// Built for x86-64.
    pub is_x86_64: bool,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, ElfError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(ElfError::Unsupported("truncated"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, ElfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
        .ok_or(ElfError::Unsupported("truncated"))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, ElfError> {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
        .ok_or(ElfError::Unsupported("truncated"))
}

fn usize_at(b: &[u8], off: usize) -> Result<usize, ElfError> {
    usize::try_from(u64_at(b, off)?).map_err(|_| ElfError::Unsupported("offset too large"))
}

fn check_ident(b: &[u8]) -> Result<(), ElfError> {
    if b.len() < 4 || &b[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if b.len() < 64 {
        return Err(ElfError::Unsupported("truncated header"));
    }
    if b[4] != 2 {
        return Err(ElfError::Unsupported("not 64-bit"));
    }
    if b[5] != 1 {
        return Err(ElfError::Unsupported("not little-endian"));
    }
    Ok(())
}

/// Reads an executable's program headers.
pub fn inspect_executable(b: &[u8]) -> Result<ExecInfo, ElfError> {
    check_ident(b)?;
    let machine = u16_at(b, 0x12)?;
    let phoff = usize_at(b, 0x20)?;
    let phentsize = u16_at(b, 0x36)? as usize;
    let phnum = u16_at(b, 0x38)? as usize;
    if phentsize < 56 && phnum > 0 {
        return Err(ElfError::Unsupported("program header entries too small"));
    }
    let mut interpreter = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(b, ph)? == PT_INTERP {
            let off = usize_at(b, ph + 8)?;
            let size = usize_at(b, ph + 32)?;
            let raw = b
                .get(off..off + size)
                .ok_or(ElfError::Unsupported("truncated interp"))?;
            let s = String::from_utf8_lossy(raw)
                .trim_end_matches('\0')
                .to_string();
            interpreter = Some(s);
        }
    }
    Ok(ExecInfo {
        is_static: interpreter.is_none(),
        interpreter,
        is_x86_64: machine == EM_X86_64,
    })
}

/// The contents of a section by name, if present.
pub fn section<'a>(b: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, ElfError> {
    check_ident(b)?;
    let shoff = usize_at(b, 0x28)?;
    let shentsize = u16_at(b, 0x3A)? as usize;
    let shnum = u16_at(b, 0x3C)? as usize;
    let shstrndx = u16_at(b, 0x3E)? as usize;
    if shnum == 0 {
        return Ok(None);
    }
    if shentsize < 64 || shstrndx >= shnum {
        return Err(ElfError::Unsupported("bad section header table"));
    }
    let sh = |i: usize| shoff + i * shentsize;
    let strtab_off = usize_at(b, sh(shstrndx) + 0x18)?;
    let strtab_size = usize_at(b, sh(shstrndx) + 0x20)?;
    let strtab = b
        .get(strtab_off..strtab_off + strtab_size)
        .ok_or(ElfError::Unsupported("truncated section names"))?;
    for i in 0..shnum {
        let name_off = u32_at(b, sh(i))? as usize;
        let sname = strtab.get(name_off..).unwrap_or_default();
        let end = sname.iter().position(|&c| c == 0).unwrap_or(sname.len());
        if &sname[..end] == name.as_bytes() {
            let off = usize_at(b, sh(i) + 0x18)?;
            let size = usize_at(b, sh(i) + 0x20)?;
            return b
                .get(off..off + size)
                .map(Some)
                .ok_or(ElfError::Unsupported("truncated section"));
        }
    }
    Ok(None)
}

/// The `depends=` list of a kernel module (`.modinfo`), module names normalised
/// with `_`. `None` if the module has no `.modinfo` section.
pub fn module_depends(b: &[u8]) -> Result<Option<Vec<String>>, ElfError> {
    let Some(info) = section(b, ".modinfo")? else {
        return Ok(None);
    };
    let mut deps = Vec::new();
    for kv in info.split(|&c| c == 0) {
        if let Some(v) = kv.strip_prefix(b"depends=") {
            let v = String::from_utf8_lossy(v);
            deps.extend(
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.replace('-', "_")),
            );
        }
    }
    Ok(Some(deps))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 file with the given program header types and sections.
    pub(crate) fn fake_elf(phdrs: &[(u32, &[u8])], sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        // Program headers right after the ELF header; payloads after them.
        let phoff = 64usize;
        b[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3A].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        b.resize(phoff + 56 * phdrs.len(), 0);
        for (i, (ty, payload)) in phdrs.iter().enumerate() {
            let off = b.len();
            b.extend_from_slice(payload);
            let ph = phoff + i * 56;
            b[ph..ph + 4].copy_from_slice(&ty.to_le_bytes());
            b[ph + 8..ph + 16].copy_from_slice(&(off as u64).to_le_bytes());
            b[ph + 32..ph + 40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        }
        // Section contents, then the name table, then the header table.
        let mut names = vec![0u8];
        let mut shdrs = vec![[0u8; 64]];
        for (name, data) in sections.iter().copied().chain([(".shstrtab", &[][..])]) {
            let name_off = names.len() as u32;
            names.extend_from_slice(name.as_bytes());
            names.push(0);
            let (off, size) = if name == ".shstrtab" {
                (0, 0)
            } else {
                let off = b.len();
                b.extend_from_slice(data);
                (off, data.len())
            };
            let mut sh = [0u8; 64];
            sh[..4].copy_from_slice(&name_off.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            shdrs.push(sh);
        }
        let names_off = b.len();
        b.extend_from_slice(&names);
        let last = shdrs.len() - 1;
        shdrs[last][0x18..0x20].copy_from_slice(&(names_off as u64).to_le_bytes());
        shdrs[last][0x20..0x28].copy_from_slice(&(names.len() as u64).to_le_bytes());
        let shoff = b.len();
        for sh in &shdrs {
            b.extend_from_slice(sh);
        }
        b[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        b[0x3C..0x3E].copy_from_slice(&(shdrs.len() as u16).to_le_bytes());
        b[0x3E..0x40].copy_from_slice(&(last as u16).to_le_bytes());
        b
    }

    #[test]
    fn static_and_dynamic() {
        let st = fake_elf(&[(1, b"code")], &[]);
        let info = inspect_executable(&st).unwrap();
        assert!(info.is_static && info.is_x86_64);
        let dy = fake_elf(
            &[(1, b"code"), (PT_INTERP, b"/lib64/ld-linux-x86-64.so.2\0")],
            &[],
        );
        let info = inspect_executable(&dy).unwrap();
        assert!(!info.is_static);
        assert_eq!(
            info.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(inspect_executable(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        assert!(inspect_executable(b"\x7fELF\x02").is_err());
    }

    #[test]
    fn real_binaries() {
        // The test binary itself is built with crt-static in this workspace.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(inspect_executable(&me).unwrap().is_x86_64);
        if let Ok(bb) = std::fs::read("/bin/busybox") {
            assert!(inspect_executable(&bb).unwrap().is_static);
        }
    }

    #[test]
    fn modinfo_depends() {
        let m = fake_elf(
            &[],
            &[
                (".text", b"xx"),
                (
                    ".modinfo",
                    b"license=GPL\0depends=virtio,virtio_ring,rng-core\0vermagic=6.1\0",
                ),
            ],
        );
        assert_eq!(
            module_depends(&m).unwrap(),
            Some(vec![
                "virtio".into(),
                "virtio_ring".into(),
                "rng_core".into()
            ])
        );
        let m = fake_elf(&[], &[(".modinfo", b"depends=\0")]);
        assert_eq!(module_depends(&m).unwrap(), Some(vec![]));
        let m = fake_elf(&[], &[(".text", b"xx")]);
        assert_eq!(module_depends(&m).unwrap(), None);
    }
}
