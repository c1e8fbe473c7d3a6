// Command matchpattern answers, with Cilium's own code, whether a toFQDNs selector admits a DNS
// name: the differential oracle of tests/test_matchpattern_oracle.py.
//
// One request a line on stdin, one answer a line on stdout, in order:
//
//	name<TAB>SELECTOR<TAB>QNAME     a matchName selector
//	pattern<TAB>SELECTOR<TAB>QNAME  a matchPattern selector
//
// QNAME is in presentation form (RFC 1035 escapes allowed). The answer is "allow", "deny",
// "invalid<TAB>WHY" when Cilium refuses the selector (the CRD schema, its MaxLength and Pattern
// markers, or the agent's own validation), or "badname<TAB>WHY" when QNAME is no DNS name.
// The verdict is the DNS proxy's: the selector becomes the regular expression
// dnsproxy.GeneratePattern builds from it, and the name is what the proxy reads from a query's
// wire form (packed and unpacked by Cilium's DNS library), lower-cased and made fully qualified
// as DNSProxy.CheckAllowed does before matching.
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

	"github.com/cilium/dns"

	"github.com/cilium/cilium/pkg/fqdn/matchpattern"
	"github.com/cilium/cilium/pkg/policy/api"
)

var (
	crdMatchName    = regexp.MustCompile(api.FQDNMatchNameRegexString)
	crdMatchPattern = regexp.MustCompile(api.FQDNMatchPatternRegexString)
)

// compile returns the proxy's regular expression for one selector, or why Cilium refuses it.
func compile(kind, selector string) (*regexp.Regexp, string) {
	if len(selector) > matchpattern.MaxFQDNLength {
		return nil, "longer than the CRD's MaxLength"
	}
	sel := api.FQDNSelector{}
	switch kind {
	case "name":
		if !crdMatchName.MatchString(selector) {
			return nil, "CRD schema: matchName does not match " + api.FQDNMatchNameRegexString
		}
		sel.MatchName = selector
	case "pattern":
		if !crdMatchPattern.MatchString(selector) {
			return nil, "CRD schema: matchPattern does not match " + api.FQDNMatchPatternRegexString
		}
		sel.MatchPattern = selector
	default:
		return nil, "unknown selector kind " + kind
	}
	// The agent's validation (FQDNSelector.sanitize through the rule's Sanitize).
	rule := api.PortRuleDNS(sel)
	if err := rule.Sanitize(); err != nil {
		return nil, "agent: " + err.Error()
	}
	// dnsproxy.GeneratePattern for one rule, without importing the agent.
	var expr string
	if kind == "name" {
		expr = matchpattern.ToUnAnchoredRegexp(strings.ToLower(dns.Fqdn(selector)))
	} else {
		expr = matchpattern.ToUnAnchoredRegexp(matchpattern.Sanitize(selector))
		if expr == matchpattern.MatchAllUnAnchoredPattern {
			return nil, ""
		}
	}
	re, err := regexp.Compile("^(?:" + expr + ")$")
	if err != nil {
		return nil, "regexp: " + err.Error()
	}
	return re, ""
}

func answer(line string) string {
	fields := strings.SplitN(line, "\t", 3)
	if len(fields) != 3 {
		return "invalid\trequest is not KIND<TAB>SELECTOR<TAB>NAME"
	}
	re, why := compile(fields[0], fields[1])
	if why != "" {
		return "invalid\t" + strings.ReplaceAll(why, "\n", " ")
	}
	// The proxy reads the name from the wire: a presentation form that does not pack into a
	// name is no query at all, and the name matched is the one unpacked again.
	wire := make([]byte, 256)
	end, err := dns.PackDomainName(dns.Fqdn(fields[2]), wire, 0, nil, false)
	if err != nil {
		return "badname\t" + err.Error()
	}
	unpacked, _, err := dns.UnpackDomainName(wire[:end], 0)
	if err != nil {
		return "badname\t" + err.Error()
	}
	name := strings.ToLower(dns.Fqdn(unpacked))
	// A nil expression is the match-all pattern, which the proxy admits without matching.
	if re == nil || re.MatchString(name) {
		return "allow"
	}
	return "deny"
}

func main() {
	in := bufio.NewReaderSize(os.Stdin, 64*1024)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for {
		line, err := in.ReadString('\n')
		if line != "" {
			fmt.Fprintln(out, answer(strings.TrimSuffix(line, "\n")))
		}
		if err == io.EOF {
			return
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "matchpattern:", err)
			os.Exit(1)
		}
		// Flush at the end of each batch the caller wrote, so that it may also go line by line.
		if in.Buffered() == 0 {
			out.Flush()
		}
	}
}
