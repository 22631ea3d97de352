"""The readiness check finds each planted fault, names the file, and never crashes."""

import json
import socket

import nibabel as nib
import numpy as np
import yaml

from cli.main import main as kidneyfl
from client.governance import approve
from client.readiness import check_site, format_check
from common.config import load_site_config
from tests.fakes import write_site_yaml as _write_site_yaml

PUBLISHED = "ab" * 32  # the consortium's published bundle hash


def write_site_yaml(tmp, name, **kw):
    """A site that approved the consortium's bundle by its published hash, as
    a site does before its readiness check (the data checks are the point)."""
    path = _write_site_yaml(tmp, name, **kw)
    approve(path, sha256=PUBLISHED)
    return path


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _plant(root):
    """One fault per case; returns {case_id: expected finding kind}."""
    c = {i: root / f"case_{i:05d}" for i in range(10)}
    img = lambda i: c[i] / "imaging.nii.gz"  # noqa: E731
    seg = lambda i: c[i] / "segmentation.nii.gz"  # noqa: E731
    img(0).write_bytes(img(0).read_bytes()[:300])  # truncated gzip
    s = nib.load(str(seg(1)))
    lab = np.asanyarray(s.dataobj).copy()
    lab[0, 0, 0] = 7
    _save(seg(1), lab, s.affine)  # label 7
    s = nib.load(str(seg(2)))
    _save(seg(2), np.ascontiguousarray(np.asanyarray(s.dataobj)[:-1]), s.affine)
    i3 = nib.load(str(img(3)))
    d = np.asanyarray(i3.dataobj).astype(np.float32).copy()
    d[1, 1, 1] = np.nan
    _save(img(3), d, i3.affine)  # NaN voxels
    _save(img(4), np.zeros((8, 8), np.float32))  # 2D
    seg(5).unlink()  # missing label -> unlabelled (prediction only)
    img(6).write_bytes(b"")  # empty
    i7 = nib.load(str(img(7)))
    _save(img(7), (np.asanyarray(i7.dataobj) / 1000).astype(np.float32), i7.affine)
    (root / "case_00010").mkdir()
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):  # duplicate of case 8
        (root / "case_00010" / name).write_bytes((c[8] / name).read_bytes())
    return {
        "case_00000": "truncated",
        "case_00001": "unknown-label",
        "case_00002": "shape-mismatch",
        "case_00003": "non-finite",
        "case_00004": "not-3d",
        "case_00006": "empty",
        "case_00007": "ct-range",
    }


def test_each_planted_fault_has_its_own_finding(tmp_path):
    yaml_path = write_site_yaml(tmp_path, "h", cases=10)
    expected = _plant(tmp_path / "data" / "h")
    report = check_site(yaml_path)
    kinds = {}
    for f in report.findings:
        case = next((p for p in f.file.split("/") if p.startswith("case_")), f.file)
        kinds.setdefault(case, set()).add(f.kind)
    for case, kind in expected.items():
        assert kind in kinds.get(case, set()), (case, kinds.get(case))
    assert report.cases_unlabelled == ["case_00005"]
    assert report.duplicates == [["case_00008", "case_00010"]]
    assert report.cases_found == 11
    assert report.cases_usable == 3  # cases 8, 9, 10
    # 10 duplicates 8: the same patient twice, which training refuses, so even
    # --allow-skips cannot make the site ready
    report.allow_skips = True
    assert not report.ok
    text = format_check(report)
    assert "ERROR truncated" in text and "case_00000/imaging.nii.gz" in text
    assert "ERROR identical-images" in text and "case_00010/imaging" in text
    assert text.splitlines()[-1].startswith(
        "NOT READY: training would refuse (identical-images)"
    )


def test_not_ready_exit_code_and_json(tmp_path, capsys):
    yaml_path = write_site_yaml(tmp_path, "h", cases=2)
    (tmp_path / "data" / "h" / "case_00000" / "imaging.nii.gz").write_bytes(b"junk")
    assert kidneyfl(["site", "check", str(yaml_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["cases_usable"] == 1
    assert any(f["kind"] == "setup-too-few-cases" for f in doc["findings"])


def test_bad_yaml_is_reported_not_raised(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {root: .}\nstate_dir: s\nprivacy: {enabled: true}\n")
    report = check_site(bad)
    assert not report.ok
    assert report.findings[0].kind == "setup-config"
    assert "max_epsilon" in report.findings[0].message


def test_unreachable_coordinator_is_reported(tmp_path):
    yaml_path = write_site_yaml(tmp_path, "h", cases=3)
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = check_site(yaml_path, superlink=f"127.0.0.1:{port}")
    assert report.environment["superlink_reachable"] is False
    assert any(f.kind == "setup-superlink" for f in report.findings)
    assert not report.ok


def test_environment_is_reported(tmp_path):
    report = check_site(write_site_yaml(tmp_path, "h", cases=3))
    env = report.environment
    assert env["state_dir_writable"] and env["free_disk_gb"] > 0
    assert "cuda_available" in env and env["epsilon_spent"] == 0.0


def _tls_files(tmp_path):
    """A CA, a server certificate for 127.0.0.1 signed by it, and a stranger CA."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)

    def cert(subject, key, issuer, issuer_key, ca, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), False)
        return b.sign(issuer_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    out = {}
    for tag in ("ca", "other"):
        k = ec.generate_private_key(ec.SECP256R1())
        out[tag] = (k, cert(f"{tag} CA", k, f"{tag} CA", k, True))
        (tmp_path / f"{tag}.pem").write_bytes(out[tag][1].public_bytes(pem))
    sk = ec.generate_private_key(ec.SECP256R1())
    server = cert(
        "127.0.0.1",
        sk,
        "ca CA",
        out["ca"][0],
        False,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    (tmp_path / "server.pem").write_bytes(server.public_bytes(pem))
    (tmp_path / "server.key").write_bytes(
        sk.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return tmp_path / "ca.pem", tmp_path / "other.pem"


def test_tls_certificate_is_verified(tmp_path):
    import ssl
    import threading

    ca, other = _tls_files(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(10)
    port = srv.getsockname()[1]

    def serve():
        for _ in range(2):
            try:
                conn, _ = srv.accept()
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yaml_path = write_site_yaml(tmp_path, "h", cases=3)
    good = check_site(yaml_path, superlink=f"127.0.0.1:{port}", root_certificates=ca)
    assert good.environment["tls_verified"] is True and good.ok
    bad = check_site(yaml_path, superlink=f"127.0.0.1:{port}", root_certificates=other)
    assert bad.environment["tls_verified"] is False
    assert any(f.kind == "setup-tls" for f in bad.findings) and not bad.ok
    t.join(10)
    srv.close()


def _break_four(root):
    """Truncated image, label 7, NaN voxels, misaligned label: cases 0-3 of 6."""
    img = lambda i: root / f"case_{i:05d}" / "imaging.nii.gz"  # noqa: E731
    seg = lambda i: root / f"case_{i:05d}" / "segmentation.nii.gz"  # noqa: E731
    img(0).write_bytes(img(0).read_bytes()[:300])
    s = nib.load(str(seg(1)))
    lab = np.asanyarray(s.dataobj).copy()
    lab[0, 0, 0] = 7
    _save(seg(1), lab, s.affine)
    i2 = nib.load(str(img(2)))
    d = np.asanyarray(i2.dataobj).astype(np.float32).copy()
    d[1, 1, 1] = np.nan
    _save(img(2), d, i2.affine)
    s = nib.load(str(seg(3)))
    moved = s.affine.copy()
    moved[:3, 3] += 40.0  # the label sits 4 cm away from the image
    _save(seg(3), np.asanyarray(s.dataobj), moved)


def test_broken_cases_fail_the_check_unless_skipped(tmp_path, capsys):
    yaml_path = write_site_yaml(tmp_path, "h", cases=6)
    _break_four(tmp_path / "data" / "h")
    assert kidneyfl(["site", "check", str(yaml_path)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        "NOT READY: 4 of 6 cases have errors (training would use 2, leave out 4); "
        "fix them or pass --allow-skips"
    )
    assert kidneyfl(["site", "check", str(yaml_path), "--allow-skips"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "READY: 2 cases will train, 4 left out"
    assert kidneyfl(["site", "check", str(yaml_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["verdict"].startswith("NOT READY: 4 of 6")
    assert doc["cases_usable"] == 2 and doc["cases_left_out"] == 4
    assert sorted(doc["cases_with_errors"]) == [f"case_{i:05d}" for i in range(4)]
    # listing the broken cases in the YAML is the operator's acknowledgement
    doc = yaml.safe_load(yaml_path.read_text())
    doc["data"]["exclude_cases"] = [f"case_{i:05d}" for i in range(4)]
    yaml_path.write_text(yaml.safe_dump(doc))
    assert kidneyfl(["site", "check", str(yaml_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "READY: 2 cases will train, 4 left out"


def _manifest_site(tmp_path, rows):
    """A phantom site re-listed in a manifest with a patient column."""
    yaml_path = write_site_yaml(tmp_path, "m", cases=6)
    root = tmp_path / "data" / "m"
    lines = ["image,label,split,patient"]
    for case, split, patient in rows:
        lines.append(
            f"case_{case:05d}/imaging.nii.gz,case_{case:05d}/segmentation.nii.gz,"
            f"{split},{patient}"
        )
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return yaml_path


def test_patient_problems_are_errors_that_skips_do_not_hide(tmp_path, capsys):
    rows = [(0, "train", "p0"), (1, "train", "p0"), (2, "train", "p2")]
    rows += [(3, "validation", "p2"), (4, "train", "p4"), (5, "validation", "p5")]
    yaml_path = _manifest_site(tmp_path, rows)
    report = check_site(yaml_path, allow_skips=True)
    errors = [f for f in report.findings if f.severity == "error"]
    assert sorted(f.kind for f in errors) == [
        "patient-in-train-and-validation",
        "repeated-patient",  # p0
        "repeated-patient",  # p2
    ]
    p0 = next(f for f in errors if "patient p0" in f.message)
    assert "case_00000/imaging" in p0.file and "case_00001/imaging" in p0.file
    assert "exclude_cases" in p0.fix
    both = next(f for f in errors if f.kind == "patient-in-train-and-validation")
    assert "patient p2" in both.message and "case_00003/imaging" in both.file
    assert kidneyfl(["site", "check", str(yaml_path), "--allow-skips"]) == 1
    assert "NOT READY: training would refuse" in capsys.readouterr().out


def test_too_few_patients_for_dp_and_for_the_metric_floor_warn(tmp_path):
    privacy = {"enabled": True, "max_epsilon": 8.0, "delta": 1e-3}
    privacy["min_cases_for_aggregates"] = 5
    report = check_site(write_site_yaml(tmp_path, "h", cases=6, privacy=privacy))
    warnings = {f.kind: f for f in report.findings if f.severity == "warning"}
    assert report.train_patients == 4 and report.validation_patients == 2
    assert "4 training patient(s)" in warnings["dp-few-patients"].message
    assert "withheld" in warnings["few-validation-patients"].message
    assert report.ok  # warnings, not errors
    off = {"enabled": False, "min_cases_for_aggregates": 2}
    report = check_site(write_site_yaml(tmp_path, "o", cases=6, privacy=off))
    kinds = {f.kind for f in report.findings}
    assert not kinds & {"dp-few-patients", "few-validation-patients"}


def test_classification_site_is_checked_by_patient(tmp_path, capsys):
    from sim.phantoms.sites import write_site_phantom
    from tests.fakes import write_cls_yaml

    yaml_path = write_cls_yaml(tmp_path, "c", cases=12)
    approve(yaml_path, sha256=PUBLISHED)
    write_site_phantom(load_site_config(yaml_path))
    report = check_site(yaml_path)
    assert report.task == "classification" and report.cases_usable == 12
    assert report.train_patients + report.validation_patients == 12
    assert sum(report.class_cases.values()) == 12 and report.ok
    manifest = tmp_path / "data" / "c" / "manifest.csv"
    rows = manifest.read_text().splitlines()
    # the first two slices: one patient, one row in training, one in validation
    body = [rows[1] + ",train,pat", rows[2] + ",validation,pat"]
    body += [r + ",," for r in rows[3:]]
    manifest.write_text("\n".join([rows[0] + ",split,patient", *body]) + "\n")
    assert kidneyfl(["site", "check", str(yaml_path), "--allow-skips"]) == 1
    out = capsys.readouterr().out
    assert "ERROR patient-in-train-and-validation" in out
    assert "patient pat is in both training and validation" in out


# -- governance: the gate must have something it would run ----------------------
def test_no_approval_is_not_ready(tmp_path, capsys):
    yaml_path = _write_site_yaml(tmp_path, "h", cases=3)  # approval on, none given
    report = check_site(yaml_path)
    assert not report.ok and [f.kind for f in report.blocking] == ["setup-approval"]
    assert report.environment["require_approval"] is True
    assert kidneyfl(["site", "check", str(yaml_path)]) == 1
    out = capsys.readouterr().out
    assert "ERROR setup-approval (1)" in out
    assert f"kidneyfl site approve {yaml_path} BUNDLE.fab" in out
    assert "--sha256" in out
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith("NOT READY: training would refuse (setup-approval)")
    )
    assert kidneyfl(["site", "check", str(yaml_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["blocking"] == ["setup-approval"]
    assert doc["verdict"].startswith("NOT READY")


def test_approved_site_is_ready_and_lists_the_approval(tmp_path, capsys):
    yaml_path = _write_site_yaml(tmp_path, "h", cases=3)
    assert kidneyfl(["site", "approve", str(yaml_path), "--sha256", PUBLISHED]) == 0
    capsys.readouterr()
    assert kidneyfl(["site", "check", str(yaml_path)]) == 0
    out = capsys.readouterr().out
    assert f"OK approval: required; 1 approved bundle(s): sha256:{PUBLISHED[:12]}" in (
        out
    )
    assert "setup-approval" not in out and out.strip().splitlines()[-1].startswith(
        "READY"
    )
    assert kidneyfl(["site", "check", str(yaml_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["blocking"] == []
    assert doc["environment"]["approved_apps"] == [PUBLISHED]


def test_approval_off_warns_but_is_ready(tmp_path, capsys):
    yaml_path = _write_site_yaml(tmp_path, "h", cases=3)
    doc = yaml.safe_load(yaml_path.read_text())
    doc["governance"] = {"require_approval": False}
    yaml_path.write_text(yaml.safe_dump(doc))
    assert kidneyfl(["site", "check", str(yaml_path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING approval-off (1)" in out
    assert "any app bundle the coordinator sends will run" in out
    assert "OK approval" not in out
