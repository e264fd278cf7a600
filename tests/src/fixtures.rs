//! Images built offline, in Rust, as OCI layouts, then pushed with skopeo:
//! a runnable busybox image, images of random layers of chosen sizes, and a
//! multi-arch index. Every digest is known to the test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::Compression;
use flate2::write::GzEncoder;
use rand::{RngCore, SeedableRng};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::process::run;
use crate::registry::Registry;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A blob in the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

/// One platform's image manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: String,
    pub bytes: Vec<u8>,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

/// What a tag points at: one manifest, or an index of several.
#[derive(Debug, Clone)]
pub struct Image {
    /// The OCI layout folder holding every blob.
    pub layout: PathBuf,
    pub tag: String,
    /// Digest and bytes of what the tag points at (manifest or index).
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
    /// The platform manifests (one for a plain image).
    pub manifests: Vec<Manifest>,
}

impl Image {
    /// Every layer digest of every platform.
    pub fn layer_digests(&self) -> Vec<String> {
        self.manifests
            .iter()
            .flat_map(|m| m.layers.iter().map(|l| l.digest.clone()))
            .collect()
    }

    /// Path of a blob in the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.layout, digest)
    }

    /// Pushes the image (all platforms, digests preserved) to
    /// `registry` as `repo:tag`.
    pub fn push(&self, registry: &Registry, repo: &str, tag: &str) -> Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--all",
            "--preserve-digests",
            "-q",
        ])
        .args(registry.skopeo_flags("dest"))
        .arg(format!("oci:{}:{}", self.layout.display(), self.tag))
        .arg(format!("docker://{}/{repo}:{tag}", registry.host()));
        run(&mut cmd)?;
        Ok(())
    }
}

/// Builds images into one OCI layout folder.
pub struct LayoutBuilder {
    dir: PathBuf,
    index: Vec<serde_json::Value>,
}

impl LayoutBuilder {
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))
            .ctx(|| format!("creating OCI layout {}", dir.display()))?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .ctx(|| "writing oci-layout".into())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        })
    }

    /// A runnable image: static busybox as `/bin/busybox` with `sh`, `echo`,
    /// `cat`, `ls`, `true` and `sleep` linked to it; `Cmd` is `/bin/sh`.
    pub fn busybox(&mut self, tag: &str) -> Result<Image> {
        let busybox = std::fs::read("/bin/busybox")
            .ctx(|| "reading /bin/busybox (Debian package busybox-static)".into())?;
        let mut tar = tar::Builder::new(Vec::new());
        append_dir(&mut tar, "bin/")?;
        append_file(&mut tar, "bin/busybox", &busybox, 0o755)?;
        for applet in ["sh", "echo", "cat", "ls", "true", "sleep", "wget"] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            h.set_mtime(0);
            tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
                .ctx(|| "building busybox layer".into())?;
        }
        let tar = tar.into_inner().ctx(|| "finishing busybox layer".into())?;
        let layer = self.gzip_layer(&tar, Compression::fast())?;
        let manifest = self.manifest("amd64", vec![layer], &["/bin/sh"])?;
        self.tag_manifest(tag, manifest)
    }

    /// An image whose layers each hold one file of `size` random bytes
    /// (seeded, so the same call gives the same digests). Layers are gzip
    /// streams of stored blocks: valid for every client, and fast to make
    /// even at 1 GiB.
    pub fn random(&mut self, tag: &str, layer_sizes: &[u64], seed: u64) -> Result<Image> {
        let mut layers = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            layers.push(self.random_layer(*size, seed.wrapping_add(i as u64))?);
        }
        let manifest = self.manifest("amd64", layers, &["/data"])?;
        self.tag_manifest(tag, manifest)
    }

    /// A multi-arch index: the busybox image for amd64 and a small random
    /// image for arm64.
    pub fn multi_arch(&mut self, tag: &str) -> Result<Image> {
        let amd = self.busybox(&format!("{tag}-amd64"))?.manifests.remove(0);
        let arm_layer = self.random_layer(64 * 1024, 0xa4a4)?;
        let arm = self.manifest("arm64", vec![arm_layer], &["/bin/sh"])?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": amd.digest, "size": amd.bytes.len(),
                 "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": OCI_MANIFEST, "digest": arm.digest, "size": arm.bytes.len(),
                 "platform": {"architecture": "arm64", "os": "linux"}},
            ],
        });
        let bytes = serde_json::to_vec(&index)?;
        let digest = self.write_blob(&bytes)?;
        self.index.push(json!({
            "mediaType": OCI_INDEX, "digest": digest, "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        self.write_index()?;
        Ok(Image {
            layout: self.dir.clone(),
            tag: tag.to_string(),
            digest,
            media_type: OCI_INDEX.into(),
            bytes,
            manifests: vec![amd, arm],
        })
    }

    fn random_layer(&mut self, size: u64, seed: u64) -> Result<Blob> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let path = self.dir.join("layer.tmp");
        let file = std::fs::File::create(&path).ctx(|| format!("creating {}", path.display()))?;
        let gz = GzEncoder::new(std::io::BufWriter::new(file), Compression::none());
        let mut tar = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        let reader = RandomReader {
            rng: &mut rng,
            left: size,
        };
        tar.append_data(&mut h, "data", reader)
            .ctx(|| "writing random layer".into())?;
        let gz = tar.into_inner().ctx(|| "finishing random layer".into())?;
        let mut out = gz.finish().ctx(|| "finishing gzip".into())?;
        out.flush().ctx(|| "flushing random layer".into())?;
        drop(out);
        let (digest, size) = hash_file(&path)?;
        let dest = blob_path(&self.dir, &digest);
        std::fs::rename(&path, &dest).ctx(|| format!("moving layer to {}", dest.display()))?;
        Ok(Blob {
            digest,
            size,
            media_type: OCI_LAYER_GZIP.into(),
        })
    }

    fn gzip_layer(&mut self, tar: &[u8], level: Compression) -> Result<Blob> {
        let mut gz = GzEncoder::new(Vec::new(), level);
        gz.write_all(tar).ctx(|| "compressing layer".into())?;
        let bytes = gz.finish().ctx(|| "compressing layer".into())?;
        let digest = self.write_blob(&bytes)?;
        Ok(Blob {
            digest,
            size: bytes.len() as u64,
            media_type: OCI_LAYER_GZIP.into(),
        })
    }

    fn manifest(&mut self, arch: &str, layers: Vec<Blob>, cmd: &[&str]) -> Result<Manifest> {
        // diff_ids are digests of the uncompressed tars; clients verify them
        // when unpacking.
        let mut diff_ids = Vec::new();
        for l in &layers {
            diff_ids.push(uncompressed_digest(&blob_path(&self.dir, &l.digest))?);
        }
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config_bytes = serde_json::to_vec(&config)?;
        let config = Blob {
            digest: self.write_blob(&config_bytes)?,
            size: config_bytes.len() as u64,
            media_type: OCI_CONFIG.into(),
        };
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size},
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type, "digest": l.digest, "size": l.size,
            })).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&manifest)?;
        let digest = self.write_blob(&bytes)?;
        Ok(Manifest {
            digest,
            bytes,
            config,
            layers,
        })
    }

    fn tag_manifest(&mut self, tag: &str, manifest: Manifest) -> Result<Image> {
        self.index.push(json!({
            "mediaType": OCI_MANIFEST, "digest": manifest.digest, "size": manifest.bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        self.write_index()?;
        Ok(Image {
            layout: self.dir.clone(),
            tag: tag.to_string(),
            digest: manifest.digest.clone(),
            media_type: OCI_MANIFEST.into(),
            bytes: manifest.bytes.clone(),
            manifests: vec![manifest],
        })
    }

    fn write_index(&self) -> Result<()> {
        let index = json!({"schemaVersion": 2, "manifests": self.index});
        let path = self.dir.join("index.json");
        std::fs::write(&path, serde_json::to_vec(&index)?)
            .ctx(|| format!("writing {}", path.display()))
    }

    fn write_blob(&self, bytes: &[u8]) -> Result<String> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let path = blob_path(&self.dir, &digest);
        std::fs::write(&path, bytes).ctx(|| format!("writing {}", path.display()))?;
        Ok(digest)
    }
}

/// `sha256:<hex>` of a byte string.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    layout.join("blobs/sha256").join(hex)
}

fn hash_file(path: &Path) -> Result<(String, u64)> {
    let f = std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    hash_reader(f).ctx(|| format!("hashing {}", path.display()))
}

/// sha256 digest and length of everything `r` yields (sha2 0.11 has no
/// `io::Write` impl to copy into).
pub fn hash_reader(mut r: impl std::io::Read) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), total))
}

fn uncompressed_digest(gz_path: &Path) -> Result<String> {
    let f = std::fs::File::open(gz_path).ctx(|| format!("opening {}", gz_path.display()))?;
    let dec = flate2::read::GzDecoder::new(std::io::BufReader::new(f));
    let (digest, _) = hash_reader(dec).ctx(|| format!("decompressing {}", gz_path.display()))?;
    Ok(digest)
}

fn append_dir(tar: &mut tar::Builder<Vec<u8>>, path: &str) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(0);
    tar.append_data(&mut h, path, std::io::empty())
        .ctx(|| format!("adding {path} to layer"))
}

fn append_file(tar: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    tar.append_data(&mut h, path, data)
        .ctx(|| format!("adding {path} to layer"))
}

/// Yields `left` pseudo-random bytes.
struct RandomReader<'a> {
    rng: &'a mut rand::rngs::SmallRng,
    left: u64,
}

impl std::io::Read for RandomReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        self.rng.fill_bytes(&mut buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Checks that `bytes` hash to `digest`.
pub fn verify_digest(bytes: &[u8], digest: &str) -> Result<()> {
    let got = sha256_digest(bytes);
    if got == digest {
        Ok(())
    } else {
        Err(Error::Other(format!(
            "digest mismatch: want {digest}, got {got}"
        )))
    }
}
