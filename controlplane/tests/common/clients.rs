//! What the real-client suites share (`clients.rs`, plain HTTP; `clients_auth.rs`, HTTPS with
//! credentials): checking the clients are installed, running them with a time limit, the images
//! they push (gzip'd tar layers, a config with diff ids, an OCI manifest, an OCI image layout), a
//! private home for skopeo, podman and buildah, and `ctr` against a containerd of the test's own.

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::containerd::Containerd;
use super::{random_bytes, sha256, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST};

pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// The oras-py release `.ci/run` installs and these tests were written against.
pub const ORAS_PIP: &str = "oras==0.2.43";

/// Longest any one client command may take before it is killed and the test fails.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Clients: presence, skipping, running with a timeout
// ---------------------------------------------------------------------------------------------

/// True if the test should run. With `LIGHTER_SKIP_CLIENT_TESTS=1` it prints "skipped: ..." and
/// is false; otherwise every client named must be installed, or the test fails saying how to
/// install it.
pub fn clients(names: &[&str]) -> bool {
    clients_with(names, &[])
}

/// [`clients`], with the tools in `helpers` (the test's own setup runs them) required too.
pub fn clients_with(names: &[&str], helpers: &[&str]) -> bool {
    if std::env::var("LIGHTER_SKIP_CLIENT_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("skipped: LIGHTER_SKIP_CLIENT_TESTS=1 (this test drives {names:?})");
        return false;
    }
    for &name in names.iter().chain(helpers) {
        let (present, install) = match name {
            "oras" => (
                Command::new("python3")
                    .args(["-c", "import oras.client, oras.oci, oras.provider"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                format!("python3 -m pip install {ORAS_PIP}"),
            ),
            "containerd" | "ctr" => (on_path(name), "apt-get install containerd".to_string()),
            "podman" => (
                on_path(name),
                "apt-get install podman uidmap fuse-overlayfs".to_string(),
            ),
            "htpasswd" => (on_path(name), "apt-get install apache2-utils".to_string()),
            other => (on_path(other), format!("apt-get install {other}")),
        };
        assert!(
            present,
            "{name} is not installed: install it with `{install}` (`bash .ci/run` installs every \
             client on Debian 12), or set LIGHTER_SKIP_CLIENT_TESTS=1 to skip the client tests"
        );
    }
    true
}

pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// `program arg arg ...`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Reads a pipe to its end on a thread; the result arrives on the returned channel.
fn collect(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

fn kill_group(pgid: u32) {
    // SAFETY: kill(2) on a process group this test created.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
}

/// Runs `cmd` in a process group of its own, no stdin, output captured. Past `CLIENT_TIMEOUT`
/// the whole group is killed and the test fails with what the command had printed.
pub fn run(cmd: &mut Command) -> Output {
    use std::os::unix::process::CommandExt;
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let pgid = child.id();
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status: Option<ExitStatus> = loop {
        if let Some(status) = child.try_wait().expect("wait for client") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            kill_group(pgid);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Something the command left behind may still hold its pipes: give it a moment, then kill
    // the group (it still exists while a member holds a pipe, so its id cannot have been reused).
    let take = |rx: &mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                kill_group(pgid);
                rx.recv().unwrap_or_default()
            })
    };
    let out = take(&stdout);
    let err = take(&stderr);
    match status {
        Some(status) => Output {
            status,
            stdout: out,
            stderr: err,
        },
        None => panic!(
            "`{what}` did not finish within {CLIENT_TIMEOUT:?} and was killed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        ),
    }
}

/// Runs `cmd` and asserts it succeeded, showing its output otherwise.
pub fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "`{}` failed ({})\nstdout:\n{}\nstderr:\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` and asserts it failed, its stdout and stderr together holding every one of
/// `needles`; returns that text.
pub fn refused(cmd: &mut Command, needles: &[&str]) -> String {
    let out = run(cmd);
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "`{}` succeeded where it should have been refused:\n{said}",
        describe(cmd)
    );
    for needle in needles {
        assert!(
            said.contains(needle),
            "`{}` failed ({}), but without saying {needle:?}:\n{said}",
            describe(cmd),
            out.status
        );
    }
    said
}

pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// ---------------------------------------------------------------------------------------------
// Images built by the tests: tar layers, gzip, config, manifest, OCI image layout
// ---------------------------------------------------------------------------------------------

/// A ustar archive of directories (names ending in `/`) and regular files, owned by root.
pub fn tar(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, content) in entries {
        assert!(name.len() < 100, "tar name too long: {name}");
        let dir = name.ends_with('/');
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(if dir { b"0000755\0" } else { b"0000644\0" });
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", content.len()).as_bytes());
        h[136..148].copy_from_slice(format!("{:011o}\0", 1_700_000_000u64).as_bytes());
        h[148..156].copy_from_slice(b"        ");
        h[156] = if dir { b'5' } else { b'0' };
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(content);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// `gzip -n` (no name, no timestamp: the same input always gives the same bytes).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), data).unwrap();
    ok(Command::new("gzip").args(["-n", "-c"]).arg(tmp.path())).stdout
}

/// `gzip -dc`.
pub fn gunzip(data: &[u8]) -> Vec<u8> {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), data).unwrap();
    ok(Command::new("gzip").args(["-d", "-c"]).arg(tmp.path())).stdout
}

pub fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256(bytes), "size": bytes.len()})
}

pub fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("sha256 digest")
}

/// The layer digests a manifest lists.
pub fn layer_digests_of(manifest: &[u8]) -> Vec<String> {
    let m: Value = serde_json::from_slice(manifest).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// One platform's image: three gzip'd tar layers, its config and its OCI manifest. Every layer
/// adds `etc/lighter/layer-<i>.txt` and a `data/blob-<i>.bin`, and rewrites
/// `etc/lighter/release`, so an unpacked image shows all layers applied in order.
pub struct Image {
    pub arch: &'static str,
    pub seed: u64,
    pub layers: Vec<Vec<u8>>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    pub digest: String,
}

impl Image {
    /// Layer `i` holds what `layer(i)` gives: the text of `layer-<i>.txt` and the bytes of
    /// `blob-<i>.bin`. The config is labelled `org.example.test=<label>`; the manifest carries
    /// `annotations` if given.
    pub fn build(
        arch: &'static str,
        seed: u64,
        label: &str,
        annotations: Option<Value>,
        layer: impl Fn(u64) -> (String, Vec<u8>),
    ) -> Image {
        let mut tars = Vec::new();
        for i in 0..3u64 {
            let (text, blob) = layer(i);
            tars.push(tar(&[
                ("etc/".into(), Vec::new()),
                ("etc/lighter/".into(), Vec::new()),
                (format!("etc/lighter/layer-{i}.txt"), text.into_bytes()),
                (
                    Self::release_path().into(),
                    Self::release(seed, i).into_bytes(),
                ),
                ("data/".into(), Vec::new()),
                (format!("data/blob-{i}.bin"), blob),
            ]));
        }
        let layers: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect();
        let config = serde_json::to_vec(&json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": arch,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", format!("LIGHTER_TEST_SEED={seed}")],
                "Cmd": ["/bin/sh"],
                "Labels": {"org.example.test": label},
            },
            "rootfs": {
                "type": "layers",
                "diff_ids": tars.iter().map(|t| sha256(t)).collect::<Vec<_>>(),
            },
            "history": (0..tars.len())
                .map(|i| json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("test layer {i}")}))
                .collect::<Vec<_>>(),
        }))
        .unwrap();
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": layers.iter().map(|l| descriptor(OCI_LAYER, l)).collect::<Vec<_>>(),
        });
        if let Some(annotations) = annotations {
            manifest["annotations"] = annotations;
        }
        let manifest = serde_json::to_vec(&manifest).unwrap();
        let digest = sha256(&manifest);
        Image {
            arch,
            seed,
            layers,
            config,
            manifest,
            digest,
        }
    }

    /// A layer's `blob-<i>.bin`: `size` random (incompressible) bytes seeded by the image and
    /// the layer, then `lines` compressible lines.
    pub fn blob(seed: u64, layer: u64, size: usize, lines: usize) -> Vec<u8> {
        let mut blob = random_bytes(size, seed * 100 + layer);
        blob.extend(
            format!("compressible tail of layer {layer}\n")
                .repeat(lines)
                .bytes(),
        );
        blob
    }

    pub fn release_path() -> &'static str {
        "etc/lighter/release"
    }

    pub fn release(seed: u64, layer: u64) -> String {
        format!("image {seed}, written by layer {layer}\n")
    }

    /// Config, manifest and layers.
    pub fn blobs(&self) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = vec![&self.config, &self.manifest];
        v.extend(self.layers.iter().map(|l| l.as_slice()));
        v
    }

    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| sha256(l)).collect()
    }

    pub fn config_digest(&self) -> String {
        sha256(&self.config)
    }
}

/// An OCI image layout at `dir`: `oci-layout`, every blob under `blobs/sha256/`, and `index.json`
/// naming each `(tag, media type, manifest bytes)` with `org.opencontainers.image.ref.name`.
pub fn write_layout(dir: &Path, blobs: &[&[u8]], refs: &[(&str, &str, &[u8])]) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    for blob in blobs {
        std::fs::write(dir.join("blobs/sha256").join(hex(&sha256(blob))), blob).unwrap();
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": refs.iter().map(|(tag, media_type, bytes)| {
            let mut d = descriptor(media_type, bytes);
            d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
            d
        }).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The containers tools: a private home, storage and configuration per test
// ---------------------------------------------------------------------------------------------

/// A home for skopeo, podman and buildah: `registries.conf` (marking the server insecure when it
/// speaks plain HTTP), a permissive signature policy in `$HOME/.config/containers/policy.json`, an
/// (empty) auth file and a temporary directory of its own, and vfs storage roots under it. Nothing
/// is read from or written to /etc/containers or /var/lib/containers except containers/image's
/// blob info cache.
pub struct Tools {
    dir: tempfile::TempDir,
    host: String,
    /// `--cert-dir` for a server over HTTPS: a directory holding the test CA as `ca.crt`.
    certs: Option<String>,
}

impl Tools {
    /// For a server at `host` over plain HTTP: `registries.conf` marks it insecure.
    pub fn plain(host: String) -> Tools {
        let conf = format!(
            "unqualified-search-registries = []\n\n\
             [[registry]]\nlocation = \"{host}\"\ninsecure = true\n"
        );
        Self::with_registries_conf(host, &conf, None)
    }

    /// For a server at `host` over HTTPS, its CA in `cert_dir`: no registry marked insecure.
    pub fn https(host: String, cert_dir: &Path) -> Tools {
        let certs = cert_dir.display().to_string();
        Self::with_registries_conf(host, "unqualified-search-registries = []\n", Some(certs))
    }

    fn with_registries_conf(host: String, registries_conf: &str, certs: Option<String>) -> Tools {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join(".config/containers")).unwrap();
        std::fs::create_dir_all(p.join("tmp")).unwrap();
        // podman and buildah refuse a REGISTRY_AUTH_FILE that does not exist.
        std::fs::write(p.join("auth.json"), r#"{"auths":{}}"#).unwrap();
        std::fs::write(
            p.join(".config/containers/policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        std::fs::write(p.join("registries.conf"), registries_conf).unwrap();
        std::fs::write(
            p.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{d}/events.log\"\n",
                d = p.display()
            ),
        )
        .unwrap();
        std::fs::write(
            p.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/storage/default/run\"\n\
                 graphroot = \"{d}/storage/default/root\"\n",
                d = p.display()
            ),
        )
        .unwrap();
        Tools { dir, host, certs }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `--cert-dir` (and `--src-cert-dir`, `--dest-cert-dir`): the directory holding the CA.
    pub fn certs(&self) -> &str {
        self.certs
            .as_deref()
            .expect("the tools of a plain HTTP server have no CA")
    }

    /// `program` with this home, configuration, auth file and storage.
    pub fn command(&self, program: &str) -> Command {
        let p = self.path();
        let mut cmd = Command::new(program);
        cmd.env("HOME", p)
            .env("XDG_CONFIG_HOME", p.join(".config"))
            .env("XDG_RUNTIME_DIR", p.join("tmp"))
            .env("TMPDIR", p.join("tmp"))
            .env("REGISTRY_AUTH_FILE", p.join("auth.json"))
            .env("CONTAINERS_REGISTRIES_CONF", p.join("registries.conf"))
            .env("CONTAINERS_CONF", p.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", p.join("storage.conf"))
            .current_dir(p);
        cmd
    }

    /// `skopeo <args>`, not run.
    pub fn skopeo(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("skopeo");
        cmd.args(args);
        cmd
    }

    /// `podman <args>` on the storage named `store` (a test may use several, so a pull is really
    /// a pull and not a local hit); no systemd cgroups, no journald, libpod's tmpdir of its own.
    /// Not run.
    pub fn podman(&self, store: &str, args: &[&str]) -> Command {
        let tmp = self.path().join("storage").join(store).join("libpod-tmp");
        let mut cmd = self.command("podman");
        cmd.args(self.storage_flags(store))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .arg("--tmpdir")
            .arg(tmp)
            .args(args);
        cmd
    }

    /// `buildah <args>`, not run.
    pub fn buildah(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("buildah");
        cmd.args(self.storage_flags("buildah")).args(args);
        cmd
    }

    /// Global flags for podman and buildah: vfs storage (no overlay mounts) under `store`.
    fn storage_flags(&self, store: &str) -> Vec<String> {
        let s = self.path().join("storage").join(store);
        vec![
            "--root".into(),
            s.join("root").display().to_string(),
            "--runroot".into(),
            s.join("run").display().to_string(),
            "--storage-driver".into(),
            "vfs".into(),
        ]
    }

    /// `docker://HOST/<reference>`.
    pub fn docker(&self, reference: &str) -> String {
        format!("docker://{}/{reference}", self.host)
    }

    /// `oci:<layout>:src` of the image, its layout written on first use.
    pub fn layout(&self, img: &Image) -> String {
        let dir = self.path().join(format!("layout-{}", img.seed));
        if !dir.exists() {
            write_layout(&dir, &img.blobs(), &[("src", OCI_MANIFEST, &img.manifest)]);
        }
        format!("oci:{}:src", dir.display())
    }

    /// `skopeo --insecure-policy copy --quiet <flags> <src> <dest>`, not run.
    pub fn copy(&self, flags: &[&str], src: &str, dest: &str) -> Command {
        let mut cmd = self.skopeo(&["--insecure-policy", "copy", "--quiet"]);
        cmd.args(flags).args([src, dest]);
        cmd
    }

    /// Runs `push` (`podman push` or `buildah push` with its flags) with `--digestfile <file>
    /// <src> <dest>` appended, asserts success, and returns the digest the client wrote.
    pub fn pushed_digest(&self, mut push: Command, src: &str, dest: &str) -> String {
        let file = self.path().join(format!(
            "pushed-{}.digest",
            dest.replace(['/', ':', '@'], "-")
        ));
        ok(push.arg("--digestfile").arg(&file).args([src, dest]));
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .to_string()
    }

    /// skopeo copies the image from its OCI layout to `HOST/<reference>`, `dest_flags` saying
    /// how to reach the registry; asserts success.
    pub fn push(&self, img: &Image, reference: &str, dest_flags: &[&str]) {
        let flags: Vec<&str> = std::iter::once("--preserve-digests")
            .chain(dest_flags.iter().copied())
            .collect();
        ok(&mut self.copy(&flags, &self.layout(img), &self.docker(reference)));
    }
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// `ctr` with this module's runner (time limit, process group) and diagnostics.
pub trait Ctr {
    /// `ctr <args>`, asserting success (containerd's log in the message otherwise).
    fn ctr(&self, args: &[&str]) -> Output;
    /// `ctr <args>`, whatever its outcome.
    fn ctr_try(&self, args: &[&str]) -> Output;
    /// The digest `ctr images ls` shows for `reference`.
    fn image_digest(&self, reference: &str) -> String;
    /// `ctr images pull <flags> --snapshotter native <reference>` (layers unpacked into plain
    /// directories), asserting success.
    fn pull(&self, flags: &[&str], reference: &str) -> Output;
    /// [`Ctr::pull`], whatever its outcome.
    fn pull_try(&self, flags: &[&str], reference: &str) -> Output;
    /// Asserts containerd's content store holds every one of `blobs`, byte for byte.
    fn assert_content(&self, blobs: &[&[u8]]);
}

impl Ctr for Containerd {
    fn ctr(&self, args: &[&str]) -> Output {
        let out = self.ctr_try(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({})\nstdout:\n{}\nstderr:\n{}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        out
    }

    fn ctr_try(&self, args: &[&str]) -> Output {
        run(&mut self.command(args))
    }

    fn image_digest(&self, reference: &str) -> String {
        let list = text(&self.ctr(&["images", "ls"]));
        list.lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&reference))
            .and_then(|f| f.get(2).map(|d| d.to_string()))
            .unwrap_or_else(|| panic!("ctr images ls has no {reference}:\n{list}"))
    }

    fn pull(&self, flags: &[&str], reference: &str) -> Output {
        self.ctr(&pull_args(flags, reference))
    }

    fn pull_try(&self, flags: &[&str], reference: &str) -> Output {
        self.ctr_try(&pull_args(flags, reference))
    }

    fn assert_content(&self, blobs: &[&[u8]]) {
        for blob in blobs {
            let digest = crate::common::sha256(blob);
            let got = self.ctr(&["content", "get", &digest]).stdout;
            assert!(got == *blob, "containerd content {digest} differs");
        }
    }
}

fn pull_args<'a>(flags: &[&'a str], reference: &'a str) -> Vec<&'a str> {
    let mut args = vec!["images", "pull"];
    args.extend_from_slice(flags);
    args.extend(["--snapshotter", "native", reference]);
    args
}
