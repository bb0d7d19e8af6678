//! A throwaway certificate authority made with rcgen, and server certificates it signs, for
//! the tests that speak real TLS (the daemon's front end, an upstream over HTTPS).

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;
use std::sync::Arc;

pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub der: CertificateDer<'static>,
    /// The CA's certificate in PEM, as a `ca_file` holds it.
    pub pem: String,
}

pub fn ca() -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(rcgen::DnType::CommonName, "amq2api test CA");
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { der: cert.der().clone(), pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// The names the other helpers' certificates are for.
const LOOPBACK: [&str; 2] = ["localhost", "127.0.0.1"];

/// A certificate for `names` signed by `ca`, with its key: DER, and PEM.
pub fn server_cert(ca: &Ca, cn: &str, names: &[&str]) -> (CertificateDer<'static>, KeyPair, String) {
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.der().clone(), key, cert.pem())
}

/// Writes a server certificate for localhost signed by `ca` (`cert.pem`, `key.pem` in `dir`);
/// returns its DER.
pub fn write_server_cert(ca: &Ca, dir: &Path, cn: &str) -> CertificateDer<'static> {
    let (der, key, pem) = server_cert(ca, cn, &LOOPBACK);
    std::fs::write(dir.join("cert.pem"), pem).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    der
}

/// A TLS server configuration with a fresh certificate for localhost signed by `ca`.
pub fn server_config(ca: &Ca, cn: &str) -> Arc<rustls::ServerConfig> {
    let (der, key, _) = server_cert(ca, cn, &LOOPBACK);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .unwrap();
    Arc::new(cfg)
}
