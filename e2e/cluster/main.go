// Command cluster runs a real kube-apiserver (k8s.io/kubernetes) on loopback,
// backed by an embedded etcd (go.etcd.io/etcd/server/v3/embed), with RBAC on,
// a generated CA, serving cert, service-account key and an admin kubeconfig.
//
//	cluster -dir /tmp/x            # writes /tmp/x/kubeconfig, runs until SIGINT/SIGTERM
//
// Extra arguments after "--" are passed to kube-apiserver verbatim.
package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap/zapcore"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	dir := flag.String("dir", "", "state directory (certs, etcd data, kubeconfig); default: a new temp dir")
	port := flag.Int("port", 0, "secure port for kube-apiserver; 0 = pick a free loopback port")
	verbosity := flag.String("v", "0", "kube-apiserver klog verbosity")
	flag.Parse()
	t0 := time.Now()

	if *dir == "" {
		d, err := os.MkdirTemp("", "e2e-cluster-")
		must(err)
		*dir = d
	}
	abs, err := filepath.Abs(*dir) // kubeconfig paths must not be relative
	must(err)
	*dir = abs
	must(os.MkdirAll(*dir, 0o700))
	if *port == 0 {
		*port = freePort()
	}

	// ---- PKI -------------------------------------------------------------
	caKey, caCert := newCA()
	writeCert(filepath.Join(*dir, "ca.crt"), caCert)
	writeKey(filepath.Join(*dir, "ca.key"), caKey)

	srvKey := newKey()
	srvCert := sign(caCert, caKey, &srvKey.PublicKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.1")},
	})
	writeCert(filepath.Join(*dir, "apiserver.crt"), srvCert)
	writeKey(filepath.Join(*dir, "apiserver.key"), srvKey)

	adminKey := newKey()
	adminCert := sign(caCert, caKey, &adminKey.PublicKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "e2e-admin", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	writeCert(filepath.Join(*dir, "admin.crt"), adminCert)
	writeKey(filepath.Join(*dir, "admin.key"), adminKey)

	var saPub []byte
	saKey := newKey()
	writeKey(filepath.Join(*dir, "sa.key"), saKey)
	saPub, err = x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	must(err)
	must(os.WriteFile(filepath.Join(*dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}), 0o600))

	server := fmt.Sprintf("https://127.0.0.1:%d", *port)
	writeKubeconfig(filepath.Join(*dir, "kubeconfig"), server, *dir)

	// ---- embedded etcd -----------------------------------------------------
	ecfg := embed.NewConfig()
	ecfg.Dir = filepath.Join(*dir, "etcd")
	ecfg.LogLevel = zapcore.ErrorLevel.String()
	cu, _ := url.Parse("http://127.0.0.1:" + strconv.Itoa(freePort()))
	pu, _ := url.Parse("http://127.0.0.1:" + strconv.Itoa(freePort()))
	ecfg.ListenClientUrls, ecfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	ecfg.ListenPeerUrls, ecfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	ecfg.InitialCluster = ecfg.Name + "=" + pu.String()
	etcd, err := embed.StartEtcd(ecfg)
	must(err)
	select {
	case <-etcd.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		etcd.Server.Stop()
		fatal("embedded etcd did not become ready in 60s")
	}
	fmt.Fprintf(os.Stderr, "cluster: etcd ready at %s after %s\n", cu, time.Since(t0).Round(time.Millisecond))

	// ---- kube-apiserver ----------------------------------------------------
	args := []string{
		"--etcd-servers=" + cu.String(),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(*port),
		"--cert-dir=" + filepath.Join(*dir, "certs"),
		"--tls-cert-file=" + filepath.Join(*dir, "apiserver.crt"),
		"--tls-private-key-file=" + filepath.Join(*dir, "apiserver.key"),
		"--client-ca-file=" + filepath.Join(*dir, "ca.crt"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + filepath.Join(*dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(*dir, "sa.key"),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--endpoint-reconciler-type=none", // 127.0.0.1 is not a valid Endpoints address
		"--v=" + *verbosity,
	}
	args = append(args, flag.Args()...)

	// Readiness probe in the background: prints a line and touches <dir>/ready.
	go waitReady(server, *dir, t0)

	cmd := app.NewAPIServerCommand() // installs the SIGINT/SIGTERM handler
	cmd.SetArgs(args)
	code := cli.Run(cmd)

	etcd.Close()
	os.Remove(filepath.Join(*dir, "ready"))
	os.Exit(code)
}

func waitReady(server, dir string, t0 time.Time) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "admin.crt"), filepath.Join(dir, "admin.key"))
	must(err)
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	must(err)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}}}
	for {
		resp, err := c.Get(server + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				must(os.WriteFile(filepath.Join(dir, "ready"), []byte(server+"\n"), 0o600))
				fmt.Fprintf(os.Stderr, "cluster: READY %s kubeconfig=%s after %s\n", server, filepath.Join(dir, "kubeconfig"), time.Since(t0).Round(time.Millisecond))
				return
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// ---- helpers ----------------------------------------------------------------

func newKey() *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	must(err)
	return k
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	must(err)
	return n
}

func newCA() (*rsa.PrivateKey, *x509.Certificate) {
	k := newKey()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "e2e-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	must(err)
	c, err := x509.ParseCertificate(der)
	must(err)
	return k, c
}

func sign(ca *x509.Certificate, caKey *rsa.PrivateKey, pub *rsa.PublicKey, tmpl *x509.Certificate) *x509.Certificate {
	tmpl.SerialNumber = serial()
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(365 * 24 * time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, pub, caKey)
	must(err)
	c, err := x509.ParseCertificate(der)
	must(err)
	return c
}

func writeCert(path string, c *x509.Certificate) {
	must(os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}), 0o600))
}

func writeKey(path string, k *rsa.PrivateKey) {
	must(os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)}), 0o600))
}

func writeKubeconfig(path, server, dir string) {
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: e2e-admin
  user:
    client-certificate: %s
    client-key: %s
contexts:
- name: e2e
  context: {cluster: e2e, user: e2e-admin}
current-context: e2e
`, server, filepath.Join(dir, "ca.crt"), filepath.Join(dir, "admin.crt"), filepath.Join(dir, "admin.key"))
	must(os.WriteFile(path, []byte(kc), 0o600))
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func must(err error) {
	if err != nil {
		fatal(err.Error())
	}
}

func fatal(msg string) {
	fmt.Fprintln(os.Stderr, "cluster:", msg)
	os.Exit(1)
}
