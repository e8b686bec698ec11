"""The words of --fetch-suites and the private apt configuration's text."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.core.aptsources import (
    DEBIAN_MIRROR,
    DEBIAN_SECURITY,
    AptSuite,
    SuiteError,
    apt_conf_text,
    parse_suites,
    policy_suite,
    series_patterns,
    sources_text,
)


class SuiteWordsTests(TestCase):
    def test_names_take_debians_archives(self) -> None:
        self.assertEqual(parse_suites(["bookworm,bookworm-security", "trixie forky"]), (
            AptSuite("bookworm", DEBIAN_MIRROR), AptSuite("bookworm-security", DEBIAN_SECURITY),
            AptSuite("trixie", DEBIAN_MIRROR), AptSuite("forky", DEBIAN_MIRROR)))

    def test_a_mirror_per_suite_once_each(self) -> None:
        self.assertEqual(
            parse_suites(["trixie=http://mirror.example/debian/,trixie=http://mirror.example/"
                          "debian", "", " , "]),
            (AptSuite("trixie", "http://mirror.example/debian"),))
        self.assertEqual(parse_suites(["local=file:///srv/archive"]),
                         (AptSuite("local", "file:///srv/archive"),))

    def test_what_is_not_a_suite_is_refused(self) -> None:
        for word in ("Bookworm", "../etc", "trixie[arch=i386]", "a\"b", "-x",
                     "trixie=ftp://x/debian", "trixie=http://x/a'b", 'trixie=http://x/"',
                     "trixie=http://x/[trusted=yes]", "trixie="):
            with self.assertRaises(SuiteError, msg=word):
                parse_suites([word])


class ConfigurationTextTests(TestCase):
    def test_sources_one_stanza_per_archive(self) -> None:
        text = sources_text(parse_suites(["bookworm,bookworm-security,trixie"]), "arm64",
                            "/usr/share/keyrings/debian-archive-keyring.gpg")
        stanzas = [part for part in text.split("\n\n") if "Types:" in part]
        self.assertEqual(len(stanzas), 2)
        self.assertIn(f"URIs: {DEBIAN_MIRROR}\nSuites: bookworm trixie\nComponents: main\n"
                      "Architectures: arm64\nSigned-By: /usr/share/keyrings/debian-archive-"
                      "keyring.gpg\nTargets: Packages\n", text)
        self.assertIn(f"URIs: {DEBIAN_SECURITY}\nSuites: bookworm-security\n", text)
        self.assertNotIn("trusted", text)

    def test_every_directory_is_the_servers(self) -> None:
        text = apt_conf_text("/srv/store/.apt/", "amd64")
        paths = [line.split('"')[1] for line in text.splitlines()
                 if line.startswith("Dir::")]
        self.assertGreaterEqual(len(paths), 15)
        for path in paths:
            self.assertTrue(path.startswith("/srv/store/.apt/"), path)
        for name in ("Dir::Etc", "Dir::State::lists", "Dir::State::status",
                     "Dir::Etc::trustedparts", "Dir::Etc::preferencesparts", "Dir::Cache"):
            self.assertIn(f'\n{name} "', text)
        self.assertIn('APT::Architecture "amd64";', text)
        self.assertIn('#clear APT::Architectures;\nAPT::Architectures { "amd64"; };', text)
        self.assertIn('Acquire::AllowInsecureRepositories "false";', text)
        self.assertIn('APT::Get::AllowUnauthenticated "false";', text)

    def test_what_apt_could_misread_is_refused(self) -> None:
        for base in ('/srv/a"b', "/srv/a;b", "/srv/a\nb", ""):
            with self.assertRaises(SuiteError, msg=base):
                apt_conf_text(base, "amd64")
        with self.assertRaises(SuiteError):
            apt_conf_text("/srv", "amd64 i386")
        with self.assertRaises(SuiteError):
            sources_text(parse_suites(["trixie"]), "amd64", "/k\nTrusted: yes")


class SeriesTests(TestCase):
    def test_series_of_every_naming(self) -> None:
        names = ["linux-headers-6.1.0-41-amd64", "linux-headers-6.1.0-40-cloud-amd64",
                 "linux-headers-6.1.0-41-common", "linux-headers-6.12.95+deb12-amd64",
                 "linux-headers-6.12.95+deb12-rt-amd64", "linux-headers-6.12.118+deb13-amd64",
                 "linux-headers-6.12.115+deb13.1-amd64", "linux-headers-6.12.117+deb13-amd64",
                 "linux-headers-7.2.12+deb14-cloud-amd64", "linux-headers-amd64",
                 "linux-headers-rt-amd64", "linux-headers-6.12.118+deb13-common-rt",
                 "linux-headers-6.12.118+deb13-arm64", "linux-kbuild-6.12.118+deb13"]
        self.assertEqual(series_patterns(names, "amd64"), (
            "6.1.0-*-amd64", "6.1.0-*-cloud-amd64", "6.12.*+deb12-amd64",
            "6.12.*+deb12-rt-amd64", "6.12.*+deb13-amd64", "6.12.*+deb13.1-amd64",
            "7.2.*+deb14-cloud-amd64"))
        self.assertEqual(series_patterns(names, "arm64"), ("6.12.*+deb13-arm64",))


#: ``apt-cache policy`` as apt 2.6 prints it.
POLICY = """\
linux-headers-6.12.118+deb13-amd64:
  Installed: (none)
  Candidate: 6.12.118-1
  Version table:
     6.12.118-1 500
        500 http://deb.debian.org/debian-security trixie-security/main amd64 Packages
        500 http://deb.debian.org/debian trixie/main amd64 Packages
 *** 6.12.117-1 100
        100 /var/lib/dpkg/status
     6.12.95-1~bpo12+1 100
        100 file:/srv/archive beta/main amd64 Packages
"""


class PolicyTests(TestCase):
    def test_the_suite_of_a_version(self) -> None:
        self.assertEqual(policy_suite(POLICY, "6.12.118-1"), "trixie-security")
        self.assertEqual(policy_suite(POLICY, "6.12.95-1~bpo12+1"), "beta")
        self.assertIsNone(policy_suite(POLICY, "6.12.117-1"))
        self.assertIsNone(policy_suite(POLICY, "6.12.1-1"))
        self.assertIsNone(policy_suite("", "1"))
