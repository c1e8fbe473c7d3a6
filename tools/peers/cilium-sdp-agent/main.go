// Command cilium-sdp-agent plays the Cilium agent's part for Cilium's standalone DNS proxy in
// benches/peers: it serves the FQDNData gRPC service (Cilium's generated API,
// api/v1/standalone-dns-proxy) on the port the proxy dials, sends it one PolicyState made from
// a JSON rules file (each endpoint's ID, identity, addresses and DNS patterns; the DNS servers'
// identities, prefixes, port and protocol), and answers the FQDN-to-IP mappings the proxy reports
// after each lookup, counting what it learned.
//
//	cilium-sdp-agent -rules rules.json [-listen 127.0.0.1:10095] [-metrics 127.0.0.1:PORT]
//
// The rules file:
//
//	{"endpoints": [{"id": 1, "identity": 10001, "ips": ["127.1.0.1"],
//	                "patterns": ["n0.pool.example.com", "**.d1.example.com"]}],
//	 "servers": [{"identity": 20001, "prefixes": ["127.0.0.53/32"], "port": 53, "proto": 17}]}
//
// Every endpoint may ask every server listed. A bad file is an error naming what is wrong
// (exit status 2); nothing is served then.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"

	"google.golang.org/grpc"

	pb "github.com/cilium/cilium/api/v1/standalone-dns-proxy"
)

type endpointRules struct {
	ID       uint64   `json:"id"`
	Identity uint32   `json:"identity"`
	IPs      []string `json:"ips"`
	Patterns []string `json:"patterns"`
}

type server struct {
	Identity uint32   `json:"identity"`
	Prefixes []string `json:"prefixes"`
	Port     uint32   `json:"port"`
	Proto    uint32   `json:"proto"`
}

type rulesFile struct {
	Endpoints []endpointRules `json:"endpoints"`
	Servers   []server        `json:"servers"`
}

// policyState turns the rules file into the one PolicyState the proxy is sent.
func policyState(r rulesFile) (*pb.PolicyState, error) {
	if len(r.Servers) == 0 {
		return nil, errors.New("no servers: the proxy would allow no DNS server")
	}
	state := &pb.PolicyState{RequestId: "fqdnguard-bench-1"}
	var servers []*pb.DNSServer
	for k, s := range r.Servers {
		if s.Identity == 0 || s.Port == 0 || s.Port > 65535 || (s.Proto != 6 && s.Proto != 17) {
			return nil, fmt.Errorf("servers[%d]: identity must be non-zero, port 1-65535 and "+
				"proto 6 (TCP) or 17 (UDP), got %+v", k, s)
		}
		m := &pb.IdentityToPrefixMapping{Identity: s.Identity}
		for _, text := range s.Prefixes {
			p, err := netip.ParsePrefix(text)
			if err != nil {
				return nil, fmt.Errorf("servers[%d]: prefix %q: %w", k, text, err)
			}
			wire, err := p.Masked().MarshalBinary()
			if err != nil {
				return nil, fmt.Errorf("servers[%d]: prefix %q: %w", k, text, err)
			}
			m.Prefix = append(m.Prefix, wire)
		}
		if len(m.Prefix) == 0 {
			return nil, fmt.Errorf("servers[%d]: no prefixes", k)
		}
		state.IdentityToPrefixMapping = append(state.IdentityToPrefixMapping, m)
		servers = append(servers, &pb.DNSServer{
			DnsServerIdentity: s.Identity, DnsServerPort: s.Port, DnsServerProto: s.Proto,
		})
	}
	seen := map[uint64]bool{}
	for k, e := range r.Endpoints {
		// The proxy keys its rules by the endpoint's 16-bit ID; 0 is no endpoint.
		if e.ID == 0 || e.ID > 65535 || seen[e.ID] {
			return nil, fmt.Errorf("endpoints[%d]: id must be 1-65535 and unique, got %d", k, e.ID)
		}
		seen[e.ID] = true
		if e.Identity == 0 {
			return nil, fmt.Errorf("endpoints[%d]: identity must be non-zero", k)
		}
		info := &pb.EndpointInfo{Id: e.ID}
		for _, text := range e.IPs {
			a, err := netip.ParseAddr(text)
			if err != nil {
				return nil, fmt.Errorf("endpoints[%d]: address %q: %w", k, text, err)
			}
			info.Ip = append(info.Ip, a.AsSlice())
		}
		if len(info.Ip) == 0 {
			return nil, fmt.Errorf("endpoints[%d]: no addresses", k)
		}
		state.IdentityToEndpointMapping = append(state.IdentityToEndpointMapping,
			&pb.IdentityToEndpointMapping{Identity: e.Identity, EndpointInfo: []*pb.EndpointInfo{info}})
		state.EgressL7DnsPolicy = append(state.EgressL7DnsPolicy, &pb.DNSPolicy{
			SourceEndpointId: uint32(e.ID), DnsPattern: e.Patterns, DnsServers: servers,
		})
	}
	return state, nil
}

// agent serves FQDNData: the policy state to every stream, and counts of what comes back.
type agent struct {
	pb.UnimplementedFQDNDataServer
	state    *pb.PolicyState
	acks     atomic.Uint64
	nacks    atomic.Uint64
	mappings atomic.Uint64
	mu       sync.Mutex
	names    map[string]struct{}
}

func (a *agent) StreamPolicyState(stream pb.FQDNData_StreamPolicyStateServer) error {
	if err := stream.Send(a.state); err != nil {
		return err
	}
	for {
		ack, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if ack.GetResponse() == pb.ResponseCode_RESPONSE_CODE_NO_ERROR {
			if a.acks.Add(1) == 1 {
				log.Printf("policy state acknowledged by the proxy")
			}
		} else {
			a.nacks.Add(1)
			log.Printf("the proxy did not take the policy state: %v", ack.GetResponse())
		}
	}
}

func (a *agent) UpdateMappingRequest(
	_ context.Context, m *pb.FQDNMapping,
) (*pb.UpdateMappingResponse, error) {
	a.mappings.Add(1)
	if len(m.GetRecordIp()) > 0 {
		a.mu.Lock()
		a.names[m.GetFqdn()] = struct{}{}
		a.mu.Unlock()
	}
	return &pb.UpdateMappingResponse{Response: pb.ResponseCode_RESPONSE_CODE_NO_ERROR}, nil
}

func (a *agent) metrics(w http.ResponseWriter, _ *http.Request) {
	a.mu.Lock()
	names := len(a.names)
	a.mu.Unlock()
	fmt.Fprintf(w, "cilium_sdp_agent_acks_total %d\n", a.acks.Load())
	fmt.Fprintf(w, "cilium_sdp_agent_nacks_total %d\n", a.nacks.Load())
	fmt.Fprintf(w, "cilium_sdp_agent_mappings_total %d\n", a.mappings.Load())
	fmt.Fprintf(w, "cilium_sdp_agent_names %d\n", names)
}

func load(path string) (*pb.PolicyState, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r rulesFile
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	state, err := policyState(r)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return state, nil
}

func main() {
	log.SetPrefix("cilium-sdp-agent: ")
	log.SetFlags(0)
	listen := flag.String("listen", "127.0.0.1:10095", "where to serve FQDNData (the proxy "+
		"dials localhost:--standalone-dns-proxy-server-port)")
	rules := flag.String("rules", "", "the JSON rules file (required)")
	metrics := flag.String("metrics", "", "serve counts as text on http://ADDR/metrics")
	flag.Parse()
	if *rules == "" {
		log.Print("-rules is required")
		os.Exit(2)
	}
	state, err := load(*rules)
	if err != nil {
		log.Print(err)
		os.Exit(2)
	}
	a := &agent{state: state, names: map[string]struct{}{}}
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Print(err)
		os.Exit(1)
	}
	if *metrics != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/metrics", a.metrics)
		mlis, err := net.Listen("tcp", *metrics)
		if err != nil {
			log.Print(err)
			os.Exit(1)
		}
		go func() { log.Print(http.Serve(mlis, mux)) }()
	}
	srv := grpc.NewServer()
	pb.RegisterFQDNDataServer(srv, a)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		srv.Stop()
	}()
	log.Printf("serving FQDNData on %s: %d endpoints", lis.Addr(), len(state.EgressL7DnsPolicy))
	if err := srv.Serve(lis); err != nil {
		log.Print(err)
		os.Exit(1)
	}
}
