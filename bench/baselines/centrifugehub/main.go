// Command centrifugehub is the Centrifuge peer of the smapws benchmark: the hub a
// Go team would build on the centrifugal/centrifuge library (Debian's 0.15), fed
// from Redis the way bench/baselines/gohub is, honouring the same contract:
//
//   - env SMAPWS_HOST, SMAPWS_PORT, REDIS_URL, JWT_SECRET;
//   - GET /ws upgrades when cookie access_token holds an HS256 JWT with sub and
//     exp (401 before the upgrade otherwise), checked in HTTP middleware that
//     hands the user to Centrifuge as the connection's credentials;
//   - the client then sends Centrifuge's connect command (JSON protocol) and the
//     connection is subscribed server-side to its user's channel
//     (user_noti:<user>);
//   - PSUBSCRIBE user_noti:* (redigo); each valid message (a JSON object with a
//     string type, plus a timestamp if it has none) is published into the
//     Node's memory broker on that channel: every connection of the user gets it
//     as a Centrifuge publication push. Centrifuge's writer batches the pushes
//     queued for one connection into one frame, newline-delimited;
//   - GET /ready answers 200 once subscribed (503 before), GET /health a small
//     JSON.
//
// Idiomatic and untuned: centrifuge.DefaultConfig, the library's WebSocket
// handler with its defaults (ping every 25 s), no history, no presence.
//
// Build (Debian packages golang-go, golang-github-centrifugal-centrifuge-dev
// and what it depends on, golang-github-gomodule-redigo-dev,
// golang-github-golang-jwt-jwt-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o centrifugehub .
package main

import (
	"context"
	"encoding/json"
	"log"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/golang-jwt/jwt"
	"github.com/gomodule/redigo/redis"
)

const prefix = "user_noti:"

// userOf returns the sub of a valid access_token cookie, or "" (as gohub).
func userOf(r *http.Request, secret []byte) string {
	cookie, err := r.Cookie("access_token")
	if err != nil {
		return ""
	}
	claims := &jwt.RegisteredClaims{}
	token, err := jwt.ParseWithClaims(cookie.Value, claims, func(*jwt.Token) (interface{}, error) {
		return secret, nil
	}, jwt.WithValidMethods([]string{"HS256"}))
	if err != nil || !token.Valid || claims.ExpiresAt == nil {
		return ""
	}
	return claims.Subject
}

// auth is the HTTP middleware: 401 without a valid cookie, else the user
// becomes the connection's Centrifuge credentials.
func auth(secret []byte, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user := userOf(r, secret)
		if user == "" {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		ctx := centrifuge.SetCredentials(r.Context(), &centrifuge.Credentials{UserID: user})
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

// encode validates one published message and returns what the clients get.
func encode(data []byte) ([]byte, bool) {
	var msg map[string]interface{}
	if err := json.Unmarshal(data, &msg); err != nil {
		return nil, false
	}
	if t, ok := msg["type"].(string); !ok || t == "" {
		return nil, false
	}
	if _, ok := msg["timestamp"]; !ok {
		msg["timestamp"] = time.Now().UTC().Format("2006-01-02T15:04:05.000Z")
	}
	out, err := json.Marshal(msg)
	return out, err == nil
}

// relay publishes every user_noti:* message into the node, reconnecting after
// a second when the subscription fails.
func relay(node *centrifuge.Node, url string, ready *atomic.Bool) {
	for {
		if err := subscribe(node, url, ready); err != nil {
			log.Printf("redis subscription failed: %v", err)
		}
		ready.Store(false)
		time.Sleep(time.Second)
	}
}

func subscribe(node *centrifuge.Node, url string, ready *atomic.Bool) error {
	conn, err := redis.DialURL(url)
	if err != nil {
		return err
	}
	psc := redis.PubSubConn{Conn: conn}
	defer psc.Close()
	if err := psc.PSubscribe(prefix + "*"); err != nil {
		return err
	}
	for {
		switch v := psc.Receive().(type) {
		case redis.Message:
			if !strings.HasPrefix(v.Channel, prefix) {
				continue
			}
			out, ok := encode(v.Data)
			if !ok {
				log.Printf("dropped an invalid message")
				continue
			}
			if _, err := node.Publish(v.Channel, out); err != nil {
				log.Printf("publish into the node failed: %v", err)
			}
		case redis.Subscription:
			if v.Kind == "psubscribe" {
				ready.Store(true)
			}
		case error:
			return v
		}
	}
}

func getenv(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func main() {
	host := getenv("SMAPWS_HOST", "0.0.0.0")
	port := getenv("SMAPWS_PORT", "8081")
	url := getenv("REDIS_URL", "redis://127.0.0.1:6379/0")
	secret := []byte(os.Getenv("JWT_SECRET"))
	if len(secret) == 0 {
		log.Fatal("JWT_SECRET is required")
	}

	cfg := centrifuge.DefaultConfig
	cfg.LogLevel = centrifuge.LogLevelError
	cfg.LogHandler = func(e centrifuge.LogEntry) { log.Printf("%s: %v", e.Message, e.Fields) }
	node, err := centrifuge.New(cfg)
	if err != nil {
		log.Fatal(err)
	}
	// Each connection is subscribed server-side to its user's channel.
	node.OnConnecting(func(ctx context.Context, e centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		cred, ok := centrifuge.GetCredentials(ctx)
		if !ok {
			return centrifuge.ConnectReply{}, centrifuge.DisconnectInvalidToken
		}
		return centrifuge.ConnectReply{
			Subscriptions: map[string]centrifuge.SubscribeOptions{prefix + cred.UserID: {}},
		}, nil
	})
	if err := node.Run(); err != nil { // the default memory broker
		log.Fatal(err)
	}
	var ready atomic.Bool
	go relay(node, url, &ready)

	http.Handle("/ws", auth(secret, centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{})))
	http.HandleFunc("/ready", func(w http.ResponseWriter, r *http.Request) {
		if ready.Load() {
			w.Write([]byte("ready\n"))
			return
		}
		http.Error(w, "not ready", http.StatusServiceUnavailable)
	})
	http.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		hub := node.Hub()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]interface{}{
			"status": "ok",
			"websocket": map[string]int{
				"active_connections": hub.NumClients(),
				"active_users":       hub.NumUsers(),
			},
		})
	})
	log.Printf("centrifuge hub listening on %s:%s", host, port)
	log.Fatal(http.ListenAndServe(host+":"+port, nil))
}
