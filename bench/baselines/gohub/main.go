// Command gohub is the Go peer of the smapws benchmark: the hub a Go team would
// write with gorilla/websocket, redigo and golang-jwt, honouring the same
// contract as smapws and bench/baselines/asyncio_hub.py:
//
//   - env SMAPWS_HOST, SMAPWS_PORT, REDIS_URL, JWT_SECRET;
//   - GET /ws upgrades when cookie access_token holds an HS256 JWT with sub and
//     exp (401 before the upgrade otherwise);
//   - PSUBSCRIBE user_noti:*; each valid message (a JSON object with a string
//     type) goes to every open connection of that user as one text frame, plus
//     a timestamp if it has none;
//   - GET /ready answers 200 once subscribed (503 before), GET /health a small
//     JSON.
//
// It follows gorilla/websocket's chat example: a read pump and a write pump
// goroutine per connection, a buffered send channel per connection (a client
// whose channel is full is dropped), pings every 54 s. Idiomatic and untuned:
// library defaults, no pooling of buffers, encoding/json.
//
// Build (Debian packages golang-go, golang-github-gorilla-websocket-dev,
// golang-github-gomodule-redigo-dev, golang-github-golang-jwt-jwt-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o gohub .
package main

import (
	"encoding/json"
	"log"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt"
	"github.com/gomodule/redigo/redis"
	"github.com/gorilla/websocket"
)

const (
	prefix         = "user_noti:"
	writeWait      = 10 * time.Second
	pongWait       = 60 * time.Second
	pingPeriod     = (pongWait * 9) / 10
	maxMessageSize = 4096
	sendBuffer     = 256
)

var upgrader = websocket.Upgrader{
	ReadBufferSize:  1024,
	WriteBufferSize: 1024,
	CheckOrigin:     func(r *http.Request) bool { return true },
}

// Client is one WebSocket connection of a user.
type Client struct {
	hub  *Hub
	user string
	conn *websocket.Conn
	send chan []byte
}

// Hub maps users to their open connections.
type Hub struct {
	mu    sync.RWMutex
	users map[string]map[*Client]struct{}
	count int
}

func newHub() *Hub {
	return &Hub{users: make(map[string]map[*Client]struct{})}
}

func (h *Hub) register(c *Client) {
	h.mu.Lock()
	defer h.mu.Unlock()
	conns := h.users[c.user]
	if conns == nil {
		conns = make(map[*Client]struct{})
		h.users[c.user] = conns
	}
	conns[c] = struct{}{}
	h.count++
}

func (h *Hub) unregister(c *Client) {
	h.mu.Lock()
	defer h.mu.Unlock()
	conns := h.users[c.user]
	if _, ok := conns[c]; !ok {
		return
	}
	delete(conns, c)
	if len(conns) == 0 {
		delete(h.users, c.user)
	}
	h.count--
	close(c.send)
}

// deliver queues msg for every connection of user; a client too slow to take
// it is disconnected.
func (h *Hub) deliver(user string, msg []byte) {
	var slow []*Client
	h.mu.RLock()
	for c := range h.users[user] {
		select {
		case c.send <- msg:
		default:
			slow = append(slow, c)
		}
	}
	h.mu.RUnlock()
	for _, c := range slow {
		h.unregister(c)
	}
}

func (h *Hub) stats() (int, int) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.count, len(h.users)
}

func (c *Client) readPump() {
	defer func() {
		c.hub.unregister(c)
		c.conn.Close()
	}()
	c.conn.SetReadLimit(maxMessageSize)
	c.conn.SetReadDeadline(time.Now().Add(pongWait))
	c.conn.SetPongHandler(func(string) error {
		c.conn.SetReadDeadline(time.Now().Add(pongWait))
		return nil
	})
	for {
		if _, _, err := c.conn.ReadMessage(); err != nil {
			return
		}
	}
}

func (c *Client) writePump() {
	ticker := time.NewTicker(pingPeriod)
	defer func() {
		ticker.Stop()
		c.conn.Close()
	}()
	for {
		select {
		case msg, ok := <-c.send:
			c.conn.SetWriteDeadline(time.Now().Add(writeWait))
			if !ok {
				c.conn.WriteMessage(websocket.CloseMessage, []byte{})
				return
			}
			if err := c.conn.WriteMessage(websocket.TextMessage, msg); err != nil {
				return
			}
		case <-ticker.C:
			c.conn.SetWriteDeadline(time.Now().Add(writeWait))
			if err := c.conn.WriteMessage(websocket.PingMessage, nil); err != nil {
				return
			}
		}
	}
}

// userOf returns the sub of a valid access_token cookie, or "".
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

func serveWs(hub *Hub, secret []byte, w http.ResponseWriter, r *http.Request) {
	user := userOf(r, secret)
	if user == "" {
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader has answered the client
	}
	client := &Client{hub: hub, user: user, conn: conn, send: make(chan []byte, sendBuffer)}
	hub.register(client)
	go client.writePump()
	go client.readPump()
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

// relay forwards every user_noti:* message to the user's connections,
// reconnecting after a second when the subscription fails.
func relay(hub *Hub, url string, ready *atomic.Bool) {
	for {
		if err := subscribe(hub, url, ready); err != nil {
			log.Printf("redis subscription failed: %v", err)
		}
		ready.Store(false)
		time.Sleep(time.Second)
	}
}

func subscribe(hub *Hub, url string, ready *atomic.Bool) error {
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
			hub.deliver(v.Channel[len(prefix):], out)
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
	hub := newHub()
	var ready atomic.Bool
	go relay(hub, url, &ready)

	http.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		serveWs(hub, secret, w, r)
	})
	http.HandleFunc("/ready", func(w http.ResponseWriter, r *http.Request) {
		if ready.Load() {
			w.Write([]byte("ready\n"))
			return
		}
		http.Error(w, "not ready", http.StatusServiceUnavailable)
	})
	http.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		conns, users := hub.stats()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]interface{}{
			"status":    "ok",
			"websocket": map[string]int{"active_connections": conns, "active_users": users},
		})
	})
	log.Printf("go hub listening on %s:%s", host, port)
	log.Fatal(http.ListenAndServe(host+":"+port, nil))
}
